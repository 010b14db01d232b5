"""docker-compose.yml: hardened serving, a pinned Triton, the engine build, monitoring and pacs profiles.

No Docker engine runs here: the structure and flags are checked, and the restriction flag itself is
given to the real tritonserver (server tier) to prove it parses and closes what it should.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from medseg.node.config import load_config
from medseg.paths import MODEL_REPOSITORY, REPO_ROOT
from medseg.serving.server import PRODUCTION_SHM_BYTES
from medseg_client.protocol import ADMIN_KEY_NAME, ADMIN_PROTOCOLS, GRPC_PORT, HTTP_PORT, METRICS_PORT

COMPOSE = REPO_ROOT / "docker-compose.yml"
NODE_YAML = REPO_ROOT / "docker" / "node.yaml"
ORTHANC_JSON = REPO_ROOT / "docker" / "orthanc.json"
RESTRICTED = set(ADMIN_PROTOCOLS)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _flags(service: dict[str, Any]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in service["command"] if arg.startswith("--") and "=" in arg)


def test_triton_serves_hardened(compose: dict[str, Any]) -> None:
    triton = compose["services"]["triton"]
    flags = _flags(triton)
    assert flags["--model-control-mode"] == "none" and flags["--strict-readiness"] == "true"
    assert flags["--model-repository"] == "/models"
    assert "./model_repository:/models:ro" in triton["volumes"]
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
        protocols, _, key = flags[flag].partition(":")
        assert set(protocols.split(",")) == RESTRICTED and key.startswith(f"{ADMIN_KEY_NAME}=${{MEDSEG_ADMIN_KEY:?")
    assert flags["--http-address"].endswith(":-127.0.0.1}")  # HTTP inside the container unless asked
    assert triton["ports"] == [f"{GRPC_PORT}:{GRPC_PORT}"]  # gRPC only is published
    assert (flags["--grpc-port"], flags["--http-port"], flags["--metrics-port"]) == tuple(
        str(port) for port in (GRPC_PORT, HTTP_PORT, METRICS_PORT))
    backend = {a for a in triton["command"] if a.startswith("--backend-config=python,shm-")}
    assert backend == {f"--backend-config=python,shm-{what}-byte-size={PRODUCTION_SHM_BYTES}" for what in ("default", "growth")}


def test_triton_reserves_a_gpu_and_reports_health(compose: dict[str, Any]) -> None:
    triton = compose["services"]["triton"]
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "http://127.0.0.1:8000/v2/health/ready" in triton["healthcheck"]["test"]


def test_images_are_pinned_and_the_engine_is_built_by_the_tensorrt_that_serves_it(compose: dict[str, Any]) -> None:
    triton_image = compose["services"]["triton"]["build"]["args"]["TRITON_IMAGE"]
    engine = compose["services"]["engine"]
    release = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", triton_image)
    assert release, triton_image
    assert engine["image"] == f"nvcr.io/nvidia/tensorrt:{release.group(1)}-py3"
    assert engine["profiles"] == ["build"] and "export.build_trt" in engine["command"][-1]
    for name in ("prometheus", "grafana"):
        image = compose["services"][name]["image"]
        assert compose["services"][name]["profiles"] == ["monitoring"] and not image.endswith(":latest")


def test_prometheus_scrapes_tritons_metrics_port_and_the_dashboard_shows_the_four_views(compose: dict[str, Any]) -> None:
    port = _flags(compose["services"]["triton"])["--metrics-port"]
    prom = yaml.safe_load((REPO_ROOT / "docker" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [f"triton:{port}"]
    dash = json.loads((REPO_ROOT / "docker" / "grafana" / "dashboards" / "medseg.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us", "nv_gpu_utilization",
                   "nv_inference_request_success"):
        assert metric in exprs


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (or volume name) of a service's volumes."""
    return {target: source for source, target, *_ in (v.split(":") for v in service["volumes"])}


def test_the_pacs_profile_runs_the_node_beside_an_orthanc_with_pinned_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    orthanc, node = services["orthanc"], services["node"]
    assert orthanc["profiles"] == node["profiles"] == ["pacs"]
    assert re.fullmatch(r"jodogne/orthanc:\d+\.\d+\.\d+", orthanc["image"]), orthanc["image"]
    # the node runs in the triton service's image (medseg and its client installed), built the same way
    assert node["image"] == services["triton"]["image"] and node["build"] == services["triton"]["build"]
    assert "deploy" not in node  # no GPU: the node only talks to Triton over gRPC
    command = node["command"][-1]
    assert command.endswith("exec medseg node --config /config/node.yaml")
    assert _mounts(node)["/config/node.yaml"] == "./docker/node.yaml"
    pin = re.search(r'"(pynetdicom==[^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins pynetdicom"
    assert pin.group(1) in command and "/opt/medseg/clients" in command  # the image has medseg and its client without deps
    assert node["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "orthanc" in node["depends_on"]
    for name, where in (("orthanc-db", orthanc), ("node-storage", node)):
        assert name in compose["volumes"] and name in _mounts(where).values()


def test_the_node_config_parses_and_points_at_the_triton_and_orthanc_services(compose: dict[str, Any]) -> None:
    config = load_config(NODE_YAML)
    services = compose["services"]
    assert config.server == f"triton:{_flags(services['triton'])['--grpc-port']}"
    assert config.host == "0.0.0.0" and f"{config.port}:{config.port}" in services["node"]["ports"]
    assert _mounts(services["node"])[str(config.storage)] == "node-storage"  # received studies survive the container
    assert config.metrics_host == "0.0.0.0" and str(config.metrics_port) in services["node"]["expose"]
    orthanc = json.loads(ORTHANC_JSON.read_text())
    assert {(d.ae_title, d.host, d.port) for d in config.destinations.values()} == {
        (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])}
    for route in config.routes:
        assert route.model is None or (MODEL_REPOSITORY / route.model / "config.pbtxt").is_file(), route.model


def test_orthanc_lists_the_node_as_medseg_and_medseg_stat_on_its_published_ports(compose: dict[str, Any]) -> None:
    config = load_config(NODE_YAML)
    orthanc = json.loads(ORTHANC_JSON.read_text())
    service = compose["services"]["orthanc"]
    assert _mounts(service)["/etc/orthanc/orthanc.json"] == "./docker/orthanc.json"
    assert orthanc["DicomModalities"] == {"medseg": [config.ae_title, "node", config.port],
                                          "medseg_stat": [config.stat_ae_titles[0], "node", config.port]}
    assert orthanc["DicomAlwaysAllowStore"] and not orthanc["OverwriteInstances"]  # the node's results; one copy each
    assert f"{orthanc['DicomPort']}:{orthanc['DicomPort']}" in service["ports"]
    assert f"127.0.0.1:{orthanc['HttpPort']}:{orthanc['HttpPort']}" in service["ports"]  # REST on the host's loopback
    assert orthanc["AuthenticationEnabled"] and orthanc["RegisteredUsers"] == {"medseg": "${ORTHANC_PASSWORD}"}
    assert "ORTHANC_PASSWORD" in service["environment"]
    assert orthanc["StorageDirectory"] in _mounts(service)


@pytest.mark.server
def test_the_compose_restriction_flag_closes_admin_protocols_on_the_real_server() -> None:
    import tritonclient.grpc as g

    from medseg.serving.server import EmbeddedServer, ServerOptions

    flag = next(a for a in yaml.safe_load(COMPOSE.read_text())["services"]["triton"]["command"]
                if a.startswith("--grpc-restricted-protocol="))
    flag = re.sub(r"\$\{MEDSEG_ADMIN_KEY:\?[^}]*\}", "test-key", flag)
    with EmbeddedServer(ServerOptions(grpc_port=0, http_port=0, metrics_port=0, extra_args=[flag])) as server:
        client = g.InferenceServerClient(server.grpc_url)
        with pytest.raises(Exception, match="restricted"):
            client.get_inference_statistics()
        stats = client.get_inference_statistics(headers={"triton-grpc-protocol-medseg-admin-key": "test-key"},
                                                as_json=True)
        assert stats["model_stats"]
        assert client.is_server_ready()
