"""MIG planning and the tenants' compose file: layouts that fit, layouts refused with the reason,
MIG UUIDs read from nvidia-smi listings, one hardened Triton service per tenant behind the gateway."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from medseg.deploy import mig, mig_compose
from medseg.paths import REPO_ROOT
from medseg_client.spec import SPEC

EXAMPLES = {"A100-80GB": REPO_ROOT / "docker" / "mig" / "tenants-a100.yaml",
            "H200": REPO_ROOT / "docker" / "mig" / "tenants-h200.yaml"}
LISTINGS = {"A100-80GB": Path(__file__).parent / "data" / "nvidia-smi-L-a100.txt",
            "H200": Path(__file__).parent / "data" / "nvidia-smi-L-h200.txt"}


def _doc(gpu: str, *profiles: str) -> dict[str, Any]:
    return {"gpu": gpu, "tenants": [{"name": f"t{i}", "models": [SPEC.ensemble.name], "profile": p, "key_env": f"K{i}"}
                                    for i, p in enumerate(profiles)]}


def _check_layout(layout: mig.Layout) -> None:
    used: set[int] = set()
    for p in layout.placements:
        assert p.start in p.profile.placements
        span = set(range(p.start, p.start + p.profile.memory_slices))
        assert not span & used, "memory slices overlap"
        used |= span
    assert layout.compute_used <= mig.COMPUTE_SLICES


@pytest.mark.parametrize("gpu", sorted(EXAMPLES))
def test_the_example_tenants_fit_their_gpu(gpu: str) -> None:
    name, tenants = mig.load_tenants(EXAMPLES[gpu])
    layout = mig.plan(name, tenants)
    assert name == gpu and len(layout.placements) == len(tenants)
    _check_layout(layout)
    by_name = {p.tenant.name: p.profile for p in layout.placements}
    for t in tenants:
        if t.profile:
            assert by_name[t.name].name == t.profile
        else:  # the smallest profile whose (estimated) capacity covers the requirement
            assert t.volumes_per_s is not None and mig.capacity(gpu, by_name[t.name]) >= t.volumes_per_s
            smaller = [p for p in mig.GPUS[gpu].values() if p.compute < by_name[t.name].compute
                       and p.memory_gb >= mig.SERVER_MEMORY_GB]
            assert all(mig.capacity(gpu, p) < t.volumes_per_s for p in smaller)


def test_a_layout_needing_slot_7_for_a_1g_is_placed_around_it() -> None:
    # 3g + 2g + 1g + 1g fits an H200 only with the 3g at slices 4-7 (a 1g cannot start at slice 7)
    layout = mig.plan(*mig.parse_tenants(_doc("H200", "3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb")))
    _check_layout(layout)
    assert {p.profile.name: p.start for p in layout.placements}["3g.71gb"] == 4


@pytest.mark.parametrize(("gpu", "profiles", "message"), [
    ("A100-80GB", ("4g.40gb", "4g.40gb"), "need 8 compute slices"),
    ("H200", ("3g.71gb", "3g.71gb", "1g.18gb"), "no valid MIG placement"),
    ("H200", ("1g.35gb",) * 5, "no valid MIG placement"),
    ("A100-80GB", ("1g.10gb",), "needs about 12 GB"),
    ("A100-80GB", ("3g.71gb",), "does not exist on A100-80GB"),
    ("RTX-4090", ("1g.10gb",), "gpu must be one of"),
])
def test_layouts_that_cannot_be_served_are_refused_with_the_reason(gpu: str, profiles: tuple[str, ...], message: str) -> None:
    with pytest.raises(mig.PlanError, match=message):
        mig.plan(*mig.parse_tenants(_doc(gpu, *profiles)))


def test_seven_1g_instances_fill_an_h200() -> None:
    _check_layout(mig.plan(*mig.parse_tenants(_doc("H200", *("1g.18gb",) * 7))))


@pytest.mark.parametrize(("edit", "message"), [
    ({"key_env": "lower"}, "key_env must name an environment variable"),
    ({"requires": {"volumes_per_s": 2}}, "either profile"),
    ({"name": "Bad Name"}, "name must be lower-case"),
    ({"models": []}, "models must be a non-empty list"),
    ({"rate_limit_per_s": 0}, "rate_limit_per_s must be a positive number"),
    ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
])
def test_a_bad_tenant_entry_is_named_with_its_field(edit: dict[str, Any], message: str) -> None:
    doc = _doc("H200", "1g.18gb")
    doc["tenants"][0].update(edit)
    with pytest.raises(mig.PlanError, match=message):
        mig.parse_tenants(doc)


def test_a_throughput_beyond_one_gpu_is_refused() -> None:
    doc = {"gpu": "H200", "tenants": [{"name": "x", "models": ["m"], "key_env": "K", "requires": {"volumes_per_s": 1000}}]}
    with pytest.raises(mig.PlanError, match="exceeds what one H200 serves"):
        mig.plan(*mig.parse_tenants(doc))


def test_nvidia_smi_listings_are_read_per_gpu() -> None:
    devices = mig.parse_nvidia_smi_l(LISTINGS["A100-80GB"].read_text())
    assert [(d.gpu_index, d.profile, d.device) for d in devices] == [(0, "4g.40gb", 0), (0, "2g.20gb", 1), (0, "1g.20gb", 2),
                                                                     (1, "7g.80gb", 0)]
    assert devices[1].uuid == "MIG-53864714-0a66-5df2-9007-9268e30d9a72"


def test_a_missing_mig_device_is_named() -> None:
    layout = mig.plan(*mig.load_tenants(EXAMPLES["H200"]))
    listing = "\n".join(LISTINGS["H200"].read_text().splitlines()[:-1])  # one 1g.18gb short
    with pytest.raises(mig.PlanError, match=r"needs a 1g\.18gb MIG device on GPU 0"):
        mig.assign_devices(layout, mig.parse_nvidia_smi_l(listing))


@pytest.mark.parametrize("gpu", sorted(EXAMPLES))
def test_compose_gives_each_tenant_its_own_hardened_server_on_its_mig_device(gpu: str, tmp_path: Path) -> None:
    layout = mig.plan(*mig.load_tenants(EXAMPLES[gpu]))
    devices = mig.assign_devices(layout, mig.parse_nvidia_smi_l(LISTINGS[gpu].read_text()))
    compose_path, template_path = mig_compose.write(layout, devices, tmp_path)
    doc = yaml.safe_load(compose_path.read_text())
    base = mig_compose.base_triton_service()
    uuids = set()
    for p in layout.placements:
        svc = doc["services"][f"triton-{p.tenant.name}"]
        uuid = devices[p.tenant.name].uuid
        uuids.add(uuid)
        assert svc["environment"]["NVIDIA_VISIBLE_DEVICES"] == uuid
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [uuid]
        assert "ports" not in svc, "tenant servers are reached only through the gateway"
        assert "--model-control-mode=explicit" in svc["command"]
        assert [a for a in svc["command"] if a.startswith("--load-model=")] == [f"--load-model={m}" for m in p.tenant.models]
        restricted = [a for a in base["command"] if a.startswith(("--grpc-restricted-protocol", "--http-restricted-api"))]
        assert restricted and all(a in svc["command"] for a in restricted), "the admin protocols stay behind the key"
        assert svc["image"] == base["image"] and svc["healthcheck"] == base["healthcheck"]
    assert len(uuids) == len(layout.placements)
    gateway = doc["services"]["gateway"]
    assert set(gateway["depends_on"]) == {f"triton-{p.tenant.name}" for p in layout.placements}
    template = template_path.read_text()
    for p in layout.placements:
        assert "${" + p.tenant.key_env + "}" in template and p.tenant.key_env in gateway["environment"]


def test_mig_plan_prints_the_layout_and_commands_and_refuses_a_bad_file(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "medseg_client.cli", "mig", "plan"]
    r = subprocess.run([*cli, str(EXAMPLES["H200"])], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "nvidia-smi mig -i 0 -cgi" in r.stdout and "radiology" in r.stdout and "estimated" in r.stdout
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump(_doc("A100-80GB", "4g.40gb", "4g.40gb")))
    r = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "compute slices" in r.stderr and "Traceback" not in r.stderr


def test_the_gateway_template_is_valid_nginx_once_keys_are_filled_in(tmp_path: Path) -> None:
    import re
    import shutil

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx not installed: run `make sysdeps` (Debian package nginx-light)")
    layout = mig.plan(*mig.load_tenants(EXAMPLES["H200"]))
    devices = mig.assign_devices(layout, mig.parse_nvidia_smi_l(LISTINGS["H200"].read_text()))
    _, template = mig_compose.compose(layout, devices)
    # what the nginx image does at start: fill ${VAR} from the environment; service names resolve on the
    # compose network only, so loopback stands in for them here
    text = re.sub(r"\$\{(MEDSEG_KEY_\w+)\}", lambda m: m.group(1).lower().replace("_", "-") + "-0123456789abcdef", template)
    text = re.sub(r"triton-[a-z-]+:", "127.0.0.1:", text)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text.replace("access_log /var/log/nginx/access.log", f"access_log {tmp_path}/access.log"))
    r = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log"),
                        "-g", f"pid {tmp_path}/nginx.pid;"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
