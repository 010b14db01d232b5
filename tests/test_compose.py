"""docker-compose.yml: hardened serving, a pinned Triton, the engine build and monitoring profiles.

No Docker engine runs here: the structure and flags are checked, and the restriction flag itself is
given to the real tritonserver (server tier) to prove it parses and closes what it should.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from medseg.paths import REPO_ROOT
from medseg.serving.server import PRODUCTION_SHM_BYTES
from medseg_client.protocol import ADMIN_KEY_NAME, ADMIN_PROTOCOLS, GRPC_PORT, HTTP_PORT, METRICS_PORT

COMPOSE = REPO_ROOT / "docker-compose.yml"
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
