"""MIG planning: which GPU instance each tenant gets, whether the set fits one GPU, and the commands.

A MIG-capable GPU has 7 compute slices and 8 memory slices; a GPU instance profile takes some of
each and may start only at certain memory slices (its placements). A layout fits when the chosen
placements do not overlap and the compute slices add up to 7 or fewer. The profile tables below are
NVIDIA's (MIG user guide, "Supported MIG Profiles"); capacities for this model are estimates until
measured on the GPU (marked so wherever they are shown).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg_client.errors import MedsegError

COMPUTE_SLICES, MEMORY_SLICES = 7, 8


class PlanError(MedsegError):
    """A tenants file or a MIG layout that cannot be served, with the reason."""


@dataclass(frozen=True)
class Profile:
    """A GPU instance profile: compute slices (the ``g``), memory slices of 8, its size and placements."""

    name: str
    profile_id: int
    compute: int
    memory_slices: int
    memory_gb: float
    placements: tuple[int, ...]


def _profiles(gb: tuple[float, float, float, float]) -> dict[str, Profile]:
    """The profile table shared by A100-80GB, H100-80GB and H200, scaled by the memory of one, two, four, eight slices."""
    one, two, four, eight = gb
    rows = [
        Profile(f"1g.{one:g}gb", 19, 1, 1, one, (0, 1, 2, 3, 4, 5, 6)),
        Profile(f"1g.{two:g}gb", 15, 1, 2, two, (0, 2, 4, 6)),
        Profile(f"2g.{two:g}gb", 14, 2, 2, two, (0, 2, 4)),
        Profile(f"3g.{four:g}gb", 9, 3, 4, four, (0, 4)),
        Profile(f"4g.{four:g}gb", 5, 4, 4, four, (0,)),
        Profile(f"7g.{eight:g}gb", 0, 7, 8, eight, (0,)),
    ]
    return {p.name: p for p in rows}


GPUS: dict[str, dict[str, Profile]] = {
    "A100-80GB": _profiles((10, 20, 40, 80)),
    "H100-80GB": _profiles((10, 20, 40, 80)),
    "H200": _profiles((18, 35, 71, 141)),
}

# Estimates for this model until measured on each GPU (no GPU was available to measure them):
# a Triton server with the TensorRT FP16 ensemble needs about this much GPU memory for the largest
# study the spec admits, and a full GPU serves about this many 512 x 512 x 300 studies per second;
# a profile's share is its compute slices out of 7.
SERVER_MEMORY_GB = 12.0
FULL_GPU_VOLUMES_PER_S = {"A100-80GB": 12.0, "H100-80GB": 20.0, "H200": 22.0}
CAPACITY_NOTE = "estimated, not measured: scaled by compute slices from an assumed full-GPU rate"


def capacity(gpu: str, profile: Profile) -> float:
    """Estimated studies per second of one server on ``profile`` (see CAPACITY_NOTE)."""
    return FULL_GPU_VOLUMES_PER_S[gpu] * profile.compute / COMPUTE_SLICES


@dataclass(frozen=True)
class Tenant:
    """One tenant of the tenants file."""

    name: str
    models: tuple[str, ...]
    key_env: str
    profile: str | None = None
    volumes_per_s: float | None = None
    priority: int = 1
    rate_limit_per_s: float = 10.0
    burst: int = 5


@dataclass
class Placement:
    tenant: Tenant
    profile: Profile
    start: int  # first memory slice


@dataclass
class Layout:
    gpu: str
    placements: list[Placement] = field(default_factory=list)

    @property
    def compute_used(self) -> int:
        return sum(p.profile.compute for p in self.placements)


_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def parse_tenants(doc: dict[str, Any]) -> tuple[str, list[Tenant]]:
    """The GPU model and the tenants of a tenants document; PlanError naming the field on anything wrong."""
    if not isinstance(doc, dict):
        raise PlanError(f"a tenants file is a mapping with 'gpu' and 'tenants', got {type(doc).__name__}")
    gpu = doc.get("gpu")
    if not isinstance(gpu, str) or gpu not in GPUS:
        raise PlanError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    raw = doc.get("tenants")
    if not isinstance(raw, list) or not raw:
        raise PlanError("tenants must be a non-empty list")
    tenants, seen_names, seen_keys = [], set(), set()
    for i, t in enumerate(raw):
        where = f"tenants[{i}]"
        if not isinstance(t, dict):
            raise PlanError(f"{where}: expected a mapping, got {type(t).__name__}")
        unknown = set(t) - {"name", "models", "key_env", "profile", "requires", "priority", "rate_limit_per_s", "burst"}
        if unknown:
            raise PlanError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = t.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise PlanError(f"{where}: name must be lower-case letters, digits and '-', got {name!r}")
        where = f"tenant {name}"
        if name in seen_names:
            raise PlanError(f"{where}: the name is used twice")
        models = t.get("models")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise PlanError(f"{where}: models must be a non-empty list of model names, got {models!r}")
        key_env = t.get("key_env")
        if not isinstance(key_env, str) or not _ENV.match(key_env):
            raise PlanError(f"{where}: key_env must name an environment variable holding the tenant's key, got {key_env!r}")
        if key_env in seen_keys:
            raise PlanError(f"{where}: key_env {key_env} is shared with another tenant")
        profile, requires = t.get("profile"), t.get("requires")
        if (profile is None) == (requires is None):
            raise PlanError(f"{where}: give either profile (e.g. 3g.40gb) or requires: {{volumes_per_s: N}}")
        if profile is not None and (not isinstance(profile, str) or profile not in GPUS[gpu]):
            raise PlanError(f"{where}: profile {profile!r} does not exist on {gpu}; it has {list(GPUS[gpu])}")
        vps = None
        if requires is not None:
            vps = requires.get("volumes_per_s") if isinstance(requires, dict) else None
            if not isinstance(vps, int | float) or not 0 < vps < float("inf"):  # NaN fails too
                raise PlanError(f"{where}: requires.volumes_per_s must be a positive number, got {vps!r}")
        rate, burst, priority = t.get("rate_limit_per_s", 10.0), t.get("burst", 5), t.get("priority", 1)
        if not isinstance(rate, int | float) or not 0 < rate < float("inf"):
            raise PlanError(f"{where}: rate_limit_per_s must be a positive number, got {rate!r}")
        if not isinstance(burst, int) or burst < 0 or not isinstance(priority, int):
            raise PlanError(f"{where}: burst must be an integer >= 0 and priority an integer")
        tenants.append(Tenant(name, tuple(models), key_env, profile, float(vps) if vps else None, priority,
                              float(rate), burst))
        seen_names.add(name)
        seen_keys.add(key_env)
    return str(gpu), tenants


def load_tenants(path: Path) -> tuple[str, list[Tenant]]:
    """Read and check a tenants YAML file."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise PlanError(f"cannot read tenants file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise PlanError(f"{path} is not a text file (not UTF-8 at byte {e.start})") from e
    except yaml.YAMLError as e:
        raise PlanError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    return parse_tenants(doc)


def choose_profile(gpu: str, tenant: Tenant) -> Profile:
    """The tenant's profile, or the smallest one whose estimated capacity and memory fit its requirement."""
    profiles = GPUS[gpu]
    if tenant.profile is not None:
        chosen = profiles[tenant.profile]
        if chosen.memory_gb < SERVER_MEMORY_GB:
            raise PlanError(f"tenant {tenant.name}: {chosen.name} has {chosen.memory_gb:g} GB; a server needs about "
                            f"{SERVER_MEMORY_GB:g} GB (estimated) for the largest study")
        return chosen
    assert tenant.volumes_per_s is not None
    fits = [p for p in profiles.values() if p.memory_gb >= SERVER_MEMORY_GB and capacity(gpu, p) >= tenant.volumes_per_s]
    if not fits:
        best = max(capacity(gpu, p) for p in profiles.values())
        raise PlanError(f"tenant {tenant.name}: {tenant.volumes_per_s:g} studies/s exceeds what one {gpu} serves "
                        f"({best:.1f}/s, {CAPACITY_NOTE})")
    return min(fits, key=lambda p: (p.compute, p.memory_slices))


def plan(gpu: str, tenants: list[Tenant]) -> Layout:
    """A layout placing every tenant's profile on one GPU without overlap, or PlanError saying why none exists."""
    chosen = [(t, choose_profile(gpu, t)) for t in tenants]
    compute = sum(p.compute for _, p in chosen)
    if compute > COMPUTE_SLICES:
        raise PlanError(f"the profiles need {compute} compute slices ("
                        + ", ".join(f"{t.name} {p.name}" for t, p in chosen) + f"); one {gpu} has {COMPUTE_SLICES}")
    # largest first, then backtrack over placements
    order = sorted(chosen, key=lambda tp: (-tp[1].memory_slices, -tp[1].compute, tp[0].priority))
    used = [False] * MEMORY_SLICES
    result: list[Placement] = []

    def place(i: int) -> bool:
        if i == len(order):
            return True
        tenant, profile = order[i]
        for start in profile.placements:
            span = range(start, start + profile.memory_slices)
            if all(not used[s] for s in span):
                for s in span:
                    used[s] = True
                result.append(Placement(tenant, profile, start))
                if place(i + 1):
                    return True
                result.pop()
                for s in span:
                    used[s] = False
        return False

    if not place(0):
        mem = sum(p.memory_slices for _, p in chosen)
        raise PlanError(f"no valid MIG placement on {gpu} for " + ", ".join(f"{t.name} {p.name}" for t, p in chosen)
                        + f" ({mem} of {MEMORY_SLICES} memory slices; the profiles' allowed start slices collide)")
    return Layout(gpu, result)


def commands(layout: Layout, gpu_index: int = 0) -> list[str]:
    """The nvidia-smi commands that create the layout, and the check that the driver placed it as planned.

    Instances are created from memory slice 0 upward, so a driver that takes the first free placement
    puts each where the plan does; ``-lgi`` shows where they went (Placement Start:Size).
    """
    ordered = sorted(layout.placements, key=lambda p: p.start)
    ids = ",".join(str(p.profile.profile_id) for p in ordered)
    expected = ", ".join(f"{p.profile.name} {p.start}:{p.profile.memory_slices}" for p in ordered)
    return [
        f"sudo nvidia-smi -i {gpu_index} -mig 1     # enable MIG mode (the GPU must be idle; some need a reset)",
        f"sudo nvidia-smi mig -i {gpu_index} -dci; sudo nvidia-smi mig -i {gpu_index} -dgi   # remove old instances",
        f"sudo nvidia-smi mig -i {gpu_index} -cgi {ids} -C   # GPU instances and their compute instances",
        f"nvidia-smi mig -i {gpu_index} -lgi        # expect placements (start:size) {expected}",
        "nvidia-smi -L > mig-devices.txt            # the MIG UUIDs, for `medseg mig compose`",
    ]


def describe(layout: Layout) -> str:
    """The layout as a table with each slice's tenant and the estimated capacity."""
    lines = [f"{layout.gpu}: {layout.compute_used} of {COMPUTE_SLICES} compute slices",
             f"{'tenant':<16}{'profile':<12}{'memory slices':<16}{'studies/s (est.)':<18}priority"]
    for p in layout.placements:
        span = f"{p.start}-{p.start + p.profile.memory_slices - 1}"
        lines.append(f"{p.tenant.name:<16}{p.profile.name:<12}{span:<16}{capacity(layout.gpu, p.profile):<18.1f}"
                     f"{p.tenant.priority}")
    slots = ["."] * MEMORY_SLICES
    for i, p in enumerate(layout.placements):
        for s in range(p.start, p.start + p.profile.memory_slices):
            slots[s] = chr(ord("A") + i)
    lines.append("memory slices: [" + "".join(slots) + "]  (" + ", ".join(
        f"{chr(ord('A') + i)}={p.tenant.name}" for i, p in enumerate(layout.placements)) + ")")
    lines.append(f"capacities: {CAPACITY_NOTE}")
    return "\n".join(lines)


@dataclass(frozen=True)
class MigDevice:
    gpu_index: int
    profile: str
    device: int
    uuid: str


_GPU_LINE = re.compile(r"^GPU (\d+): .*\(UUID: (GPU-[0-9a-fA-F-]+)\)")
_MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[0-9a-fA-F-]+)\)")


def parse_nvidia_smi_l(text: str) -> list[MigDevice]:
    """The MIG devices listed by ``nvidia-smi -L``, in order."""
    devices, gpu = [], None
    for line in text.splitlines():
        if m := _GPU_LINE.match(line):
            gpu = int(m.group(1))
        elif (m := _MIG_LINE.match(line)) and gpu is not None:
            devices.append(MigDevice(gpu, m.group(1), int(m.group(2)), m.group(3)))
    return devices


def assign_devices(layout: Layout, devices: list[MigDevice], gpu_index: int = 0) -> dict[str, MigDevice]:
    """Tenant -> MIG device: each tenant gets a distinct device of its profile on ``gpu_index``."""
    free = [d for d in devices if d.gpu_index == gpu_index]
    out: dict[str, MigDevice] = {}
    for p in layout.placements:
        match = next((d for d in free if d.profile == p.profile.name), None)
        if match is None:
            have = ", ".join(f"{d.profile} (device {d.device})" for d in free) or "none left"
            raise PlanError(f"tenant {p.tenant.name} needs a {p.profile.name} MIG device on GPU {gpu_index}; "
                            f"nvidia-smi -L lists {have}: create the layout with `medseg mig plan`'s commands first")
        free.remove(match)
        out[p.tenant.name] = match
    return out
