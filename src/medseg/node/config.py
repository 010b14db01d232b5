"""The node's configuration file (YAML): who may send, where studies are kept, which model each series goes to,
where results go. Read once at start; every error names the file, the key, what was expected and what came."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg_client.errors import MedsegError

PRIORITIES = {"stat": 0, "routine": 1}  # lower runs first
_AE = re.compile(r"^[\x20-\x7e]{1,16}$")
_MATCH_KEYS = {"Modality", "BodyPartExamined", "SeriesDescription", "min_images", "max_images",
               "min_slice_thickness_mm", "max_slice_thickness_mm", "calling_ae_title", "called_ae_title"}


class ConfigError(MedsegError):
    """The node's configuration file is not what it must be."""


@dataclass(frozen=True)
class Destination:
    """A DICOM peer results are sent to by C-STORE."""

    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class Route:
    """One routing rule: a series matching ``match`` goes to ``model`` (with ``priority``, to ``destinations``),
    or, with ``skip``, is recorded as skipped for that reason."""

    name: str
    match: dict[str, Any]
    model: str | None
    skip: str | None
    priority: str | None  # None: the priority the series came with (called AE title, C-STORE priority)
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``medseg node`` needs; see docs/pacs-node.md for each key."""

    ae_title: str
    port: int
    storage: Path
    server: str
    routes: tuple[Route, ...]
    destinations: dict[str, Destination]
    host: str = "0.0.0.0"
    stat_ae_titles: tuple[str, ...] = ()
    allowed_callers: tuple[str, ...] = ()  # empty: any calling AE title
    stat_on_high_priority: bool = True  # a C-STORE with Priority HIGH makes its series STAT
    quiet_period_s: float = 10.0
    workers: int = 1  # routine (and STAT) jobs at once
    stat_workers: int = 1  # kept for STAT jobs only: a STAT study never waits behind routine work
    max_instances_per_series: int = 3000
    max_series_bytes: int = 2 * 1024**3
    max_disk_bytes: int = 50 * 1024**3
    retry_initial_s: float = 5.0
    retry_max_s: float = 600.0
    job_attempts: int = 3  # a job that fails this many times (server down, crash mid-job) is failed for good
    timeout_s: float = 600.0  # one segmentation request
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    send_preview: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.storage / "node.sqlite"

    @property
    def audit_path(self) -> Path:
        return self.storage / "audit.jsonl"


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise ConfigError(f"{where}: missing key {key!r}")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: {key} must be {names}, got {value!r}")
    return value


def _known(d: dict[str, Any], keys: set[str], where: str) -> dict[str, Any]:
    """``d``, refused when it has a key not in ``keys`` (a misspelt limit would silently keep its default)."""
    unknown = set(d) - keys
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(keys)})")
    return d


def _ae(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _AE.match(value) or value.strip() != value or "\\" in value:
        raise ConfigError(f"{where}: an AE title is 1-16 printable characters without backslash or edge spaces, "
                          f"got {value!r}")
    return value


def _port(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{where}: a TCP port is an integer in 0..65535, got {value!r}")
    return value


def _positive(value: float, where: str) -> float:
    if value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")
    return value


def _route(i: int, r: Any, destinations: dict[str, Destination], where: str) -> Route:
    here = f"{where}: routes[{i}]"
    if not isinstance(r, dict):
        raise ConfigError(f"{here}: a mapping with match and model (or skip), got {r!r}")
    unknown = set(r) - {"name", "match", "model", "skip", "priority", "destinations"}
    if unknown:
        raise ConfigError(f"{here}: unknown keys {sorted(unknown)}")
    match = _get(r, "match", dict, here, {})
    bad = set(match) - _MATCH_KEYS
    if bad:
        raise ConfigError(f"{here}: match keys are {sorted(_MATCH_KEYS)}, got {sorted(bad)}")
    if "SeriesDescription" in match:
        try:
            re.compile(str(match["SeriesDescription"]))
        except re.error as e:
            raise ConfigError(f"{here}: SeriesDescription is not a regular expression: {e}") from None
    for key in ("min_images", "max_images", "min_slice_thickness_mm", "max_slice_thickness_mm"):
        kind = int if key.endswith("images") else (int, float)
        if key in match and (not isinstance(match[key], kind) or isinstance(match[key], bool)):
            raise ConfigError(f"{here}: match.{key} must be a number{' of images' if kind is int else ' (mm)'}, "
                              f"got {match[key]!r}")
    model, skip = r.get("model"), r.get("skip")
    if (model is None) == (skip is None):
        raise ConfigError(f"{here}: give exactly one of model (a served model) or skip (the reason)")
    priority = r.get("priority")
    if priority is not None and priority not in PRIORITIES:
        raise ConfigError(f"{here}: priority must be one of {sorted(PRIORITIES)}, got {priority!r}")
    dests = tuple(_get(r, "destinations", list, here, list(destinations)))
    unknown_d = [d for d in dests if d not in destinations]
    if unknown_d:
        raise ConfigError(f"{here}: destinations {unknown_d} are not among {sorted(destinations)}")
    if model is not None and not dests:
        raise ConfigError(f"{here}: a route to a model needs at least one destination for its results")
    return Route(str(r.get("name", f"route {i}")), dict(match), None if model is None else str(model),
                 None if skip is None else str(skip), priority, dests)


def parse_config(doc: Any, where: str = "node config", base: Path | None = None) -> NodeConfig:
    """A NodeConfig from the parsed YAML document ``doc`` (relative storage paths are taken from ``base``)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: a YAML mapping, got {type(doc).__name__}")
    known = {"ae_title", "port", "host", "storage", "server", "routes", "destinations", "stat_ae_titles",
             "allowed_callers", "stat_on_high_priority", "quiet_period_s", "workers", "stat_workers", "limits",
             "retry", "job_attempts", "timeout_s", "metrics_port", "metrics_host", "send_preview"}
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    dest_doc = _get(doc, "destinations", dict, where)
    destinations = {}
    for name, d in dest_doc.items():
        here = f"{where}: destinations.{name}"
        if not isinstance(d, dict):
            raise ConfigError(f"{here}: a mapping with ae_title, host, port; got {d!r}")
        _known(d, {"ae_title", "host", "port"}, here)
        destinations[str(name)] = Destination(str(name), _ae(d.get("ae_title"), f"{here}.ae_title"),
                                              str(_get(d, "host", str, here)), _port(d.get("port"), f"{here}.port"))
    routes = tuple(_route(i, r, destinations, where) for i, r in enumerate(_get(doc, "routes", list, where)))
    if not routes:
        raise ConfigError(f"{where}: routes is empty: no series would ever be segmented")
    limits = _known(_get(doc, "limits", dict, where, {}), {"max_instances_per_series", "max_series_mb", "max_disk_gb"},
                    f"{where}: limits")
    retry = _known(_get(doc, "retry", dict, where, {}), {"initial_s", "max_s"}, f"{where}: retry")
    storage = Path(_get(doc, "storage", str, where)).expanduser()
    if not storage.is_absolute() and base is not None:
        storage = base / storage
    metrics_port = doc.get("metrics_port")
    workers = _get(doc, "workers", int, where, 1)
    stat_workers = _get(doc, "stat_workers", int, where, 1)
    if workers < 1 or stat_workers < 0:
        raise ConfigError(f"{where}: workers must be >= 1 and stat_workers >= 0, got {workers} and {stat_workers}")
    return NodeConfig(
        ae_title=_ae(doc.get("ae_title"), f"{where}: ae_title"),
        port=_port(doc.get("port"), f"{where}: port"),
        host=_get(doc, "host", str, where, "0.0.0.0"),
        storage=storage,
        server=_get(doc, "server", str, where),
        routes=routes,
        destinations=destinations,
        stat_ae_titles=tuple(_ae(a, f"{where}: stat_ae_titles") for a in _get(doc, "stat_ae_titles", list, where, [])),
        allowed_callers=tuple(_ae(a, f"{where}: allowed_callers") for a in _get(doc, "allowed_callers", list, where, [])),
        stat_on_high_priority=_get(doc, "stat_on_high_priority", bool, where, True),
        quiet_period_s=_positive(_get(doc, "quiet_period_s", float, where, 10.0), f"{where}: quiet_period_s"),
        workers=workers,
        stat_workers=stat_workers,
        max_instances_per_series=int(_positive(_get(limits, "max_instances_per_series", int, f"{where}: limits", 3000),
                                               f"{where}: limits.max_instances_per_series")),
        max_series_bytes=int(_positive(_get(limits, "max_series_mb", float, f"{where}: limits", 2048.0),
                                       f"{where}: limits.max_series_mb") * 1024**2),
        max_disk_bytes=int(_positive(_get(limits, "max_disk_gb", float, f"{where}: limits", 50.0),
                                     f"{where}: limits.max_disk_gb") * 1024**3),
        retry_initial_s=_positive(_get(retry, "initial_s", float, f"{where}: retry", 5.0), f"{where}: retry.initial_s"),
        retry_max_s=_positive(_get(retry, "max_s", float, f"{where}: retry", 600.0), f"{where}: retry.max_s"),
        job_attempts=int(_positive(_get(doc, "job_attempts", int, where, 3), f"{where}: job_attempts")),
        timeout_s=_positive(_get(doc, "timeout_s", float, where, 600.0), f"{where}: timeout_s"),
        metrics_port=None if metrics_port is None else _port(metrics_port, f"{where}: metrics_port"),
        metrics_host=_get(doc, "metrics_host", str, where, "127.0.0.1"),
        send_preview=_get(doc, "send_preview", bool, where, True),
    )


def load_config(path: Path) -> NodeConfig:
    """Read and check the YAML file at ``path``."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"node config {path}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"node config {path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    return parse_config(doc, f"node config {path}", path.parent)
