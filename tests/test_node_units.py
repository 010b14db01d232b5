"""The PACS node's parts without a network: configuration, routing rules, the SQLite store, the audit trail, the
metrics text, ``medseg jobs`` and the receiver's file writing. No Triton server, no Orthanc, no fixed sleeps: time
is steered through the quiet period, the backoff and the stored timestamps themselves."""

from __future__ import annotations

import json
import re
import sqlite3
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from medseg.node.audit import Audit, read_audit
from medseg.node.config import ConfigError, NodeConfig, Route, load_config, parse_config
from medseg.node.jobs import jobs_command
from medseg.node.metrics import BUCKETS, render
from medseg.node.receiver import safe_name, write_durably
from medseg.node.rules import Decision, SeriesInfo, decide, header_info
from medseg.node.store import Store
from medseg_client.errors import MedsegError
from medseg_client.spec import SPEC
from tests.helpers import node_config

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: not an image
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: a picture, not a volume to segment


# --- configuration -----------------------------------------------------------------------------------------------
def minimal_doc(storage: str = "/var/lib/medseg-node") -> dict[str, Any]:
    """The fewest keys a node configuration may have."""
    return {"ae_title": "MEDSEG", "port": 11112, "storage": storage, "server": "triton:8001",
            "destinations": {"pacs": {"ae_title": "PACS", "host": "pacs.example", "port": 104}},
            "routes": [{"match": {"Modality": "CT"}, "model": "ct_liver"}]}


def refusal(tmp_path: Path, overrides: dict[str, object]) -> str:
    """The message of the ConfigError that the test config with ``overrides`` gets from load_config: one line
    naming the file."""
    path = node_config(tmp_path, "whatever:1", 11112, {"pacs": ("PACS", 4242)})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **overrides}, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


def test_the_test_config_is_accepted_as_written(tmp_path: Path) -> None:
    path = node_config(tmp_path, "any string at all", 11112, {"pacs": ("PACS", 4242), "archive": ("ARCH", 4243)})
    c = load_config(path)
    assert (c.ae_title, c.host, c.port, c.server) == ("MEDSEG", "127.0.0.1", 11112, "any string at all")
    assert c.stat_ae_titles == ("MEDSEG_STAT",)
    assert c.storage == tmp_path / "storage" and c.db_path == tmp_path / "storage" / "node.sqlite"
    assert c.audit_path == tmp_path / "storage" / "audit.jsonl"
    assert (c.quiet_period_s, c.workers, c.stat_workers, c.job_attempts) == (1.0, 1, 1, 10)
    assert (c.retry_initial_s, c.retry_max_s) == (0.5, 2.0)
    assert set(c.destinations) == {"pacs", "archive"}
    assert c.destinations["archive"].ae_title == "ARCH" and c.destinations["archive"].port == 4243
    first, rest = c.routes
    assert (first.name, first.model, first.skip, first.priority) == ("abdomen-ct", SPEC.ensemble.name, None, None)
    assert first.match == {"Modality": "CT", "min_images": 10}
    assert first.destinations == ("pacs", "archive")  # a route without destinations sends to every one
    assert (rest.model, rest.skip, rest.match) == (None, "not an abdominal CT series", {})


def test_defaults_of_a_minimal_config() -> None:
    c = parse_config(minimal_doc())
    assert c.quiet_period_s == 10.0 and c.workers == 1 and c.stat_workers == 1 and c.job_attempts == 3
    assert c.host == "0.0.0.0" and c.stat_ae_titles == () and c.allowed_callers == ()
    assert c.stat_on_high_priority is True and c.send_preview is True
    assert (c.retry_initial_s, c.retry_max_s, c.timeout_s) == (5.0, 600.0, 600.0)
    assert c.max_instances_per_series == 3000
    assert c.max_series_bytes == 2048 * 1024**2 and c.max_disk_bytes == 50 * 1024**3
    assert c.metrics_port is None and c.metrics_host == "127.0.0.1"
    assert c.routes[0].name == "route 0" and c.routes[0].destinations == ("pacs",)
    assert c.storage == Path("/var/lib/medseg-node")


def test_limits_and_integers_where_floats_are_asked(tmp_path: Path) -> None:
    c = parse_config({**minimal_doc(), "quiet_period_s": 3, "timeout_s": 30, "metrics_port": 0,
                      "limits": {"max_series_mb": 1, "max_disk_gb": 2, "max_instances_per_series": 7}})
    assert c.quiet_period_s == 3.0 and isinstance(c.quiet_period_s, float) and c.timeout_s == 30.0
    assert (c.max_series_bytes, c.max_disk_bytes, c.max_instances_per_series) == (1024**2, 2 * 1024**3, 7)
    assert c.metrics_port == 0


def test_relative_storage_is_taken_from_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc" / "medseg"
    folder.mkdir(parents=True)
    (folder / "node.yaml").write_text(yaml.safe_dump(minimal_doc("data/node")))
    assert load_config(folder / "node.yaml").storage == folder / "data" / "node"
    # parse_config without a base leaves it as written (relative to wherever the node runs)
    assert parse_config(minimal_doc("data/node")).storage == Path("data/node")


@pytest.mark.parametrize(("overrides", "names"), [
    ({"colour": "red"}, ["unknown keys", "'colour'"]),
    ({"ae_title": "A" * 17}, ["ae_title", "'" + "A" * 17 + "'"]),
    ({"ae_title": "MED\\SEG"}, ["ae_title", "backslash"]),
    ({"ae_title": " MEDSEG"}, ["ae_title"]),
    ({"stat_ae_titles": ["S" * 17]}, ["stat_ae_titles"]),
    ({"port": 65536}, ["port", "65536"]),
    ({"port": -1}, ["port", "-1"]),
    ({"port": "104"}, ["port", "'104'"]),
    ({"destinations": {"pacs": {"ae_title": "PACS", "host": "h", "port": 70000}}}, ["destinations.pacs", "port", "70000"]),
    ({"destinations": {"pacs": {"ae_title": "P" * 17, "host": "h", "port": 104}}}, ["destinations.pacs", "ae_title"]),
    ({"destinations": {"pacs": {"ae_title": "PACS", "port": 104}}}, ["destinations.pacs", "host"]),
    ({"destinations": {"pacs": {"ae_title": "PACS", "host": "h", "port": 104, "aet": "X"}}},
     ["destinations.pacs: unknown keys ['aet']"]),
    ({"limits": {"max_disk": 5}}, ["limits: unknown keys ['max_disk']", "max_disk_gb"]),
    ({"retry": {"initial_s": 1, "max": 9}}, ["retry: unknown keys ['max']", "max_s"]),
    ({"routes": [{"match": {}, "model": "m", "skip": "why"}]}, ["routes[0]", "exactly one of model", "skip"]),
    ({"routes": [{"match": {"Modality": "CT"}}]}, ["routes[0]", "exactly one of model", "skip"]),
    ({"routes": [{"match": {"Modality": "CT", "Colour": "red"}, "model": "m"}]}, ["routes[0]", "match keys", "'Colour'"]),
    ({"routes": [{"match": {"SeriesDescription": "([a-z"}, "model": "m"}]}, ["routes[0]", "SeriesDescription"]),
    ({"routes": [{"match": {"min_images": "ten"}, "model": "m"}]}, ["routes[0]", "min_images", "'ten'"]),
    ({"routes": [{"match": {"max_slice_thickness_mm": "thin"}, "model": "m"}]}, ["routes[0]", "max_slice_thickness_mm"]),
    ({"routes": [{"match": {"min_images": 2.5}, "model": "m"}]}, ["routes[0]", "match.min_images", "number of images"]),
    ({"routes": [{"match": {"max_images": True}, "model": "m"}]}, ["routes[0]", "match.max_images", "True"]),
    ({"routes": [{"match": {"min_slice_thickness_mm": False}, "model": "m"}]}, ["routes[0]", "min_slice_thickness_mm"]),
    ({"routes": [{"model": "m", "destinations": ["pacs", "nowhere"]}]}, ["routes[0]", "destinations", "'nowhere'"]),
    ({"routes": [{"model": "m", "priority": "urgent"}]}, ["routes[0]", "priority", "'urgent'"]),
    ({"routes": [{"skip": "x"}, {"model": "m", "when": 1}]}, ["routes[1]", "unknown keys", "'when'"]),
    ({"routes": []}, ["routes is empty"]),
    ({"routes": "ct_liver"}, ["routes must be list"]),
    ({"workers": 0}, ["workers", "0"]),
    ({"stat_workers": -1}, ["stat_workers"]),
    ({"workers": True}, ["workers must be int"]),
    ({"quiet_period_s": 0}, ["quiet_period_s", "> 0"]),
    ({"retry": {"initial_s": -1}}, ["retry.initial_s"]),
    ({"job_attempts": 0}, ["job_attempts"]),
    ({"metrics_port": 99999}, ["metrics_port"]),
    ({"storage": 5}, ["storage must be str"]),
])
def test_a_bad_config_is_refused_in_one_line_naming_the_key(tmp_path: Path, overrides: dict[str, object],
                                                             names: list[str]) -> None:
    message = refusal(tmp_path, overrides)
    for name in names:
        assert name in message, (name, message)


def test_missing_keys_are_named(tmp_path: Path) -> None:
    for key in ("server", "destinations", "routes", "storage"):
        doc = minimal_doc()
        del doc[key]
        with pytest.raises(ConfigError, match=f"missing key '{key}'"):
            parse_config(doc, "cfg")


def test_a_file_that_is_not_a_yaml_mapping_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("ae_title: MEDSEG\nroutes: [ {model: m\n  port: : :\n")
    with pytest.raises(ConfigError) as e:
        load_config(broken)
    assert "not valid YAML" in str(e.value) and str(broken) in str(e.value) and "\n" not in str(e.value)
    text = tmp_path / "notes.txt"
    text.write_text("just a sentence, not a configuration\n")
    with pytest.raises(ConfigError, match="a YAML mapping, got str"):
        load_config(text)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="a YAML mapping, got NoneType"):
        load_config(empty)
    with pytest.raises(ConfigError, match=r"cannot be read \(No such file or directory\)"):
        load_config(tmp_path / "absent.yaml")


# --- routing rules -----------------------------------------------------------------------------------------------
def route(name: str, model: str | None = None, skip: str | None = None, priority: str | None = None,
          **match: Any) -> Route:
    return Route(name, match, model, skip, priority, ("pacs",) if model else ())


def series(**kw: Any) -> SeriesInfo:
    values: dict[str, Any] = {"sop_class_uid": CT, "modality": "CT", "body_part": "ABDOMEN",
                              "description": "Portal venous 2.0 B30f", "image_type": ("ORIGINAL", "PRIMARY", "AXIAL"),
                              "slice_thickness_mm": 2.0, "images": 120, "calling_ae_title": "PACS",
                              "called_ae_title": "MEDSEG"}
    values.update(kw)
    return SeriesInfo(**values)


def test_the_first_matching_rule_wins() -> None:
    routes = (route("mr", model="mr_model", Modality="MR"), route("ct-a", model="first", Modality="ct"),
              route("ct-b", model="second", Modality="CT"))
    d = decide(routes, series(), "routine")
    assert d == Decision(route="ct-a", model="first", priority="routine", destinations=("pacs",))
    assert decide(routes, series(modality="MR"), "routine").model == "mr_model"


def test_a_skip_rule_skips_with_its_reason() -> None:
    routes = (route("no chest", skip="chest CT is not ours", BodyPartExamined="chest"), route("ct", model="m"))
    d = decide(routes, series(body_part="CHEST"), "stat")
    assert (d.route, d.skip, d.model) == ("no chest", "chest CT is not ours", None)
    assert decide(routes, series(), "routine").model == "m"


def test_no_matching_rule_says_what_the_series_was() -> None:
    d = decide((route("mr", model="m", Modality="MR"),), series(images=3), "routine")
    assert (d.route, d.model) == ("(none)", None)
    assert d.skip == "no routing rule matches (CT, ABDOMEN, 3 image(s))"
    d = decide((route("mr", model="m", Modality="MR"),), series(modality="", body_part="", images=1), "routine")
    assert d.skip == "no routing rule matches (no modality, no body part, 1 image(s))"


@pytest.mark.parametrize(("info", "reason"), [
    (series(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "a localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER)"),
    (series(image_type=("DERIVED", "SCOUT")), "a localizer"),
    (series(sop_class_uid=SR), f"not an image series to segment (SOP class {SR})"),
    (series(sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4"), "not an image series to segment"),  # a SEG
    (series(sop_class_uid=""), "not an image series to segment (SOP class missing)"),
    (series(sop_class_uid=SC), f"not an image series to segment (SOP class {SC})"),  # e.g. our own preview
    (series(manufacturer="medseg"), "medseg's own result"),
    # the node's own result is named as such before the localizer check
    (series(manufacturer="medseg", image_type=("DERIVED", "LOCALIZER")), "medseg's own result (Manufacturer medseg)"),
])
def test_localizers_and_non_images_are_skipped_before_any_rule(info: SeriesInfo, reason: str) -> None:
    take_all = (route("everything", model="m", priority="stat"),)
    d = decide(take_all, info, "stat")
    assert d.model is None and d.route == "(built in)"
    assert d.skip is not None and d.skip.startswith(reason), d.skip


def test_another_manufacturer_is_routed_as_usual() -> None:
    take_all = (route("everything", model="m"),)
    for manufacturer in ("SIEMENS", "", "medseg research lab"):
        assert decide(take_all, series(manufacturer=manufacturer), "routine").model == "m", manufacturer


def test_series_description_is_a_regular_expression_searched() -> None:
    routes = (route("venous", model="m", SeriesDescription=r"(?i)portal|venous"),)
    assert decide(routes, series(description="Abdomen PORTAL 2mm"), "routine").model == "m"
    assert decide(routes, series(description="arterial phase"), "routine").model is None
    anchored = (route("exact", model="m", SeriesDescription=r"^Liver$"),)
    assert decide(anchored, series(description="Liver"), "routine").model == "m"
    assert decide(anchored, series(description="Liver 2"), "routine").model is None


@pytest.mark.parametrize(("images", "taken"), [(9, False), (10, True), (500, True), (501, False)])
def test_image_count_bounds_are_inclusive(images: int, taken: bool) -> None:
    routes = (route("sized", model="m", min_images=10, max_images=500),)
    assert (decide(routes, series(images=images), "routine").model == "m") is taken


@pytest.mark.parametrize(("thickness", "taken"), [(0.5, False), (1.0, True), (3.0, True), (5.0, True), (5.01, False),
                                                  (None, False)])
def test_slice_thickness_bounds_and_an_unknown_thickness_never_matches(thickness: float | None, taken: bool) -> None:
    routes = (route("thin", model="m", min_slice_thickness_mm=1.0, max_slice_thickness_mm=5),)
    assert (decide(routes, series(slice_thickness_mm=thickness), "routine").model == "m") is taken
    only_max = (route("thin", model="m", max_slice_thickness_mm=5.0),)
    assert (decide(only_max, series(slice_thickness_mm=thickness), "routine").model == "m") is (thickness is not None
                                                                                                 and thickness <= 5.0)
    # a rule that says nothing of thickness takes a series whose thickness is unknown
    assert decide((route("any", model="m"),), series(slice_thickness_mm=thickness), "routine").model == "m"


def test_called_and_calling_ae_titles() -> None:
    routes = (route("from ct1", model="ct1_model", calling_ae_title="CT1"),
              route("research", model="research", called_ae_title="MEDSEG_RES"), route("rest", skip="no"))
    assert decide(routes, series(calling_ae_title="CT1"), "routine").model == "ct1_model"
    assert decide(routes, series(calling_ae_title="CT2", called_ae_title="MEDSEG_RES"), "routine").model == "research"
    assert decide(routes, series(calling_ae_title="ct1"), "routine").skip == "no"  # AE titles are case-sensitive


@pytest.mark.parametrize(("rule", "arrived", "result"), [
    (None, "routine", "routine"), (None, "stat", "stat"),
    ("routine", "stat", "stat"),  # a series sent as STAT stays STAT under a routine rule
    ("stat", "routine", "stat"),  # a STAT rule makes a routine arrival STAT
    ("routine", "routine", "routine"), ("stat", "stat", "stat"),
])
def test_priority_the_more_urgent_of_rule_and_arrival(rule: str | None, arrived: str, result: str) -> None:
    assert decide((route("r", model="m", priority=rule),), series(), arrived).priority == result


def test_header_info_of_a_dataset() -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = CT
    ds.Modality = "CT"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower case is not valid CS, yet PACS send it
        ds.BodyPartExamined = "abdomen"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "localizer"]
    ds.SeriesDescription = "  Venous 2mm  "
    ds.SliceThickness = "2.5"
    ds.Manufacturer = " SIEMENS "
    h = header_info(ds)
    assert h == {"sop_class_uid": CT, "modality": "CT", "body_part": "ABDOMEN", "description": "Venous 2mm",
                 "image_type": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "slice_thickness_mm": 2.5, "frames": 1,
                 "manufacturer": "SIEMENS"}
    assert json.loads(json.dumps(h)) == h  # what the store keeps with the series
    fields = {k: v for k, v in h.items() if k != "frames"}
    info = SeriesInfo(**{**fields, "image_type": tuple(h["image_type"])}, images=1, calling_ae_title="A",
                      called_ae_title="B")
    assert decide((route("all", model="m"),), info, "routine").skip == "a localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER)"

    single = Dataset()
    single.ImageType = "DERIVED"  # one value: a str, not a list of letters
    assert header_info(single)["image_type"] == ["DERIVED"]

    assert header_info(Dataset()) == {"sop_class_uid": "", "modality": "", "body_part": "", "description": "",
                                      "image_type": [], "slice_thickness_mm": None, "frames": 1, "manufacturer": ""}

    multi = Dataset()
    multi.NumberOfFrames = 240  # an enhanced CT: one instance, many slices
    multi.Manufacturer = "medseg"
    h = header_info(multi)
    assert (h["frames"], h["manufacturer"]) == (240, "medseg")
    own = SeriesInfo(**{**{k: v for k, v in h.items() if k != "frames"}, "sop_class_uid": CT}, images=240,
                     calling_ae_title="A", called_ae_title="B")
    assert decide((route("all", model="m"),), own, "routine").skip == "medseg's own result (Manufacturer medseg)"


def test_header_info_frames_is_at_least_one_and_a_bad_value_is_one() -> None:
    """NumberOfFrames as the receiver decodes it from the wire: a bad or absent value counts as one frame."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    for raw, frames in ((b"12", 12), (b"1 ", 1), (b"0 ", 1), (b"-3", 1), (b"  ", 1), (b"abc ", 1), (b"1\\2 ", 1)):
        ds = Dataset()
        ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", len(raw), raw, 0, True, True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns of the invalid values
            assert header_info(ds)["frames"] == frames, raw


def test_header_info_of_an_unreadable_slice_thickness_is_none(tmp_path: Path) -> None:
    """As the receiver gets them: values decoded from the bytes on the wire, a bad DS among them."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    for raw in (b"abc ", b"1\\2 ", b"    "):
        ds = Dataset()
        ds[0x00180050] = RawDataElement(Tag(0x00180050), "DS", len(raw), raw, 0, True, True)
        ds[0x00080060] = RawDataElement(Tag(0x00080060), "CS", 2, b"CT", 0, True, True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns of the invalid value
            h = header_info(ds)
        assert h["slice_thickness_mm"] is None and h["modality"] == "CT", raw
    assert pydicom.__version__  # the pydicom these expectations hold for


# --- the store ---------------------------------------------------------------------------------------------------
INFO = {"sop_class_uid": CT, "modality": "CT", "body_part": "ABDOMEN", "description": "", "image_type": ["ORIGINAL"],
        "slice_thickness_mm": 2.0}


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "storage" / "node.sqlite")
    yield s
    s.close()


def add(store: Store, sop: str, series_uid: str = "1.2.3.1", priority: str = "routine", size: int = 100,
        study: str = "1.2.3") -> tuple[bool, str]:
    folder = store.path.parent / "incoming" / study / series_uid
    return store.add_instance(sop, series_uid, study, folder / f"{sop}.dcm", size, INFO, "PACS", "MEDSEG", priority,
                              folder)


def queued_job(store: Store, series_uid: str, priority: str = "routine") -> int:
    add(store, f"{series_uid}.1", series_uid, priority)
    row = store.series_row(series_uid)
    assert row is not None
    return store.create_job(row, "ct_liver", "abdomen-ct", priority)


def job_state(store: Store, job_id: int) -> str:
    row = store.job(job_id)
    assert row is not None
    return str(row["state"])


def test_an_instance_received_twice_counts_once(store: Store) -> None:
    assert add(store, "1.1", size=100) == (True, "receiving")
    assert add(store, "1.1", size=100) == (False, "receiving")
    assert add(store, "1.2", size=50) == (True, "receiving")
    row = store.series_row("1.2.3.1")
    assert row is not None
    assert (row["instances"], row["bytes"], row["state"], row["priority"]) == (2, 150, "receiving", "routine")
    assert json.loads(row["info"]) == INFO and (row["calling_aet"], row["called_aet"]) == ("PACS", "MEDSEG")
    assert store.stored_bytes() == 150
    assert store.series_row("9.9") is None


def test_a_series_counts_the_frames_of_its_instances(store: Store) -> None:
    folder = store.path.parent / "incoming" / "1.2.3" / "1.2.3.1"

    def add_frames(sop: str, frames: int) -> tuple[bool, str]:
        return store.add_instance(sop, "1.2.3.1", "1.2.3", folder / f"{sop}.dcm", 10, INFO, "PACS", "MEDSEG",
                                  "routine", folder, frames)

    add(store, "1.1")  # a single-frame instance: one frame
    assert add_frames("1.2", 240) == (True, "receiving")
    assert add_frames("1.2", 240) == (False, "receiving")  # received twice: counted once
    add_frames("1.3", 0)  # every instance is at least one frame
    row = store.series_row("1.2.3.1")
    assert row is not None and (row["instances"], row["frames"]) == (3, 242)


def test_a_series_takes_the_most_urgent_priority_of_its_instances(store: Store) -> None:
    add(store, "1.1", priority="routine")
    add(store, "1.2", priority="stat")
    add(store, "1.3", priority="routine")  # a later routine instance does not undo it
    row = store.series_row("1.2.3.1")
    assert row is not None and row["priority"] == "stat"


def test_quiet_series_respects_the_quiet_period(store: Store) -> None:
    add(store, "1.1", "1.2.3.1")
    add(store, "2.1", "1.2.3.2")
    assert [r["series_uid"] for r in store.quiet_series(0)] == ["1.2.3.1", "1.2.3.2"]  # oldest first
    assert store.quiet_series(3600) == []
    row = store.series_row("1.2.3.1")
    assert row is not None
    store.create_job(row, "ct_liver", "r", "routine")
    store.skip_series("1.2.3.2", "a localizer")
    assert store.quiet_series(0) == []  # routed or skipped: no longer waited on
    skipped = store.series_row("1.2.3.2")
    assert skipped is not None and (skipped["state"], skipped["reason"]) == ("skipped", "a localizer")


def test_a_refused_series_stays_refused(store: Store) -> None:
    add(store, "1.1")
    assert store.refuse_series("1.2.3.1", "too large") is True
    assert store.refuse_series("1.2.3.1", "again") is False
    row = store.series_row("1.2.3.1")
    assert row is not None and (row["state"], row["reason"]) == ("refused", "too large")
    received = store.path.parent / "incoming" / "1.2.3" / "1.2.3.1" / "1.1.dcm"
    received.parent.mkdir(parents=True, exist_ok=True)
    received.write_bytes(b"DICM")
    assert Path(row["folder"]) == received.parent
    store.drop_instances("1.2.3.1")
    assert not received.parent.exists()
    assert store.stored_bytes() == 0
    assert store.quiet_series(0) == []


def test_create_job_is_idempotent_per_series(store: Store) -> None:
    add(store, "1.1")
    row = store.series_row("1.2.3.1")
    assert row is not None
    first = store.create_job(row, "ct_liver", "abdomen-ct", "routine")
    assert store.create_job(row, "ct_liver", "abdomen-ct", "stat") == first
    assert len(store.query("SELECT * FROM jobs")) == 1
    job = store.job(first)
    assert job is not None
    assert (job["state"], job["priority"], job["attempts"], job["model"]) == ("queued", "routine", 0, "ct_liver")
    assert job["received_at"] == row["last_received"]
    series_row = store.series_row("1.2.3.1")
    assert series_row is not None and series_row["state"] == "routed"
    assert series_row["reason"] == "route abdomen-ct -> ct_liver"


def test_claim_takes_stat_first_then_the_oldest(store: Store) -> None:
    old = queued_job(store, "1.1", "routine")
    urgent = queued_job(store, "1.2", "stat")
    new = queued_job(store, "1.3", "routine")
    claimed = []
    while (row := store.claim(stat_only=False)) is not None:
        claimed.append(row["id"])
        assert (row["state"], row["attempts"]) == ("running", 1) and row["started_at"] is not None
        if row["id"] == urgent:  # no routine job starts while a STAT job runs
            store.segmented(urgent, [], {}, {}, ("pacs",))
    assert claimed == [urgent, old, new]


def test_claim_stat_only_leaves_routine_jobs(store: Store) -> None:
    routine = queued_job(store, "1.1", "routine")
    assert store.claim(stat_only=True) is None
    assert job_state(store, routine) == "queued"
    stat = queued_job(store, "1.2", "stat")
    row = store.claim(stat_only=True)
    assert row is not None and row["id"] == stat
    assert store.claim(stat_only=True) is None
    store.segmented(stat, [], {}, {}, ("pacs",))
    row = store.claim(stat_only=False)
    assert row is not None and row["id"] == routine


def test_no_routine_job_starts_while_a_stat_job_runs(store: Store) -> None:
    routine = queued_job(store, "1.1", "routine")
    stat = queued_job(store, "1.2", "stat")
    row = store.claim(stat_only=False)
    assert row is not None and row["id"] == stat
    assert store.claim(stat_only=False) is None  # a routine job is queued, but the STAT job has the server
    assert job_state(store, routine) == "queued"
    second = queued_job(store, "1.3", "stat")  # another STAT job may still start, on either kind of worker
    row = store.claim(stat_only=False)
    assert row is not None and row["id"] == second
    store.segmented(stat, [], {}, {}, ("pacs",))
    assert store.claim(stat_only=False) is None  # the second STAT job still runs
    store.job_failed(second, "boom", final=True)  # a STAT job that fails for good frees the server too
    row = store.claim(stat_only=False)
    assert row is not None and row["id"] == routine


def test_a_routine_claim_waits_for_the_stat_job_to_be_segmented(store: Store) -> None:
    stat = queued_job(store, "1.1", "stat")
    assert store.claim(stat_only=True) is not None  # a reserved STAT worker took it
    routine = queued_job(store, "1.2", "routine")
    assert store.claim(stat_only=False) is None
    store.segmented(stat, [], {}, {}, ("pacs",))
    row = store.claim(stat_only=False)
    assert row is not None and row["id"] == routine
    assert store.claim(stat_only=False) is None


def test_a_running_routine_job_does_not_hold_back_a_stat_job(store: Store) -> None:
    routine = queued_job(store, "1.1", "routine")
    row = store.claim(stat_only=False)
    assert row is not None and row["id"] == routine
    stat = queued_job(store, "1.2", "stat")
    row = store.claim(stat_only=True)
    assert row is not None and row["id"] == stat
    assert job_state(store, routine) == "running"


def test_a_failed_attempt_is_queued_again_or_failed_for_good(store: Store) -> None:
    job = queued_job(store, "1.1")
    store.claim(stat_only=False)
    store.job_failed(job, "server unreachable", final=False)
    row = store.job(job)
    assert row is not None and (row["state"], row["error"], row["attempts"]) == ("queued", "server unreachable", 1)
    row = store.claim(stat_only=False)
    assert row is not None and row["error"] is None and row["attempts"] == 2  # a new attempt clears the old error
    store.job_failed(job, "not a CT volume", final=True)
    assert job_state(store, job) == "failed"
    assert store.claim(stat_only=False) is None


def test_an_unreachable_server_gives_the_attempt_back(store: Store) -> None:
    job = queued_job(store, "1.1")
    for _ in range(5):  # however often the server is down, the job keeps its attempts
        row = store.claim(stat_only=False)
        assert row is not None and row["attempts"] == 1
        store.job_failed(job, "server unavailable", final=False, count_attempt=False)
        row = store.job(job)
        assert row is not None and (row["state"], row["attempts"], row["error"]) == ("queued", 0, "server unavailable")
    store.claim(stat_only=False)
    store.job_failed(job, "bad request", final=False)  # an answered error counts
    row = store.job(job)
    assert row is not None and (row["state"], row["attempts"]) == ("queued", 1)
    store.claim(stat_only=False)
    store.job_failed(job, "server unavailable", final=False, count_attempt=False)
    row = store.job(job)
    assert row is not None and row["attempts"] == 1


def test_recover_requeues_running_jobs_and_fails_those_out_of_attempts(store: Store) -> None:
    once = queued_job(store, "1.1")
    twice = queued_job(store, "1.2")
    waiting = queued_job(store, "1.3")
    claimed = store.claim(stat_only=False)
    assert claimed is not None and claimed["id"] == once
    claimed = store.claim(stat_only=False)
    assert claimed is not None and claimed["id"] == twice
    store.job_failed(twice, "transient", final=False)
    claimed = store.claim(stat_only=False)  # the oldest queued one is twice again (queued_at kept)
    assert claimed is not None and claimed["id"] == twice and claimed["attempts"] == 2
    assert store.recover(max_attempts=2) == ([once], [twice])
    assert job_state(store, once) == "queued"
    row = store.job(twice)
    assert row is not None and row["state"] == "failed" and row["error"] == "interrupted 2 times (node stopped mid-job)"
    assert job_state(store, waiting) == "queued"
    assert store.recover(max_attempts=2) == ([], [])


def test_segmented_owes_each_destination_a_delivery_and_sent_needs_them_all(store: Store) -> None:
    job = queued_job(store, "1.1")
    store.claim(stat_only=False)
    outputs = [{"kind": "SEG", "path": "/x/seg.dcm"}]
    store.segmented(job, outputs, {"total": 1.5}, {"liver_ml": 1500.0}, ("pacs", "archive"))
    row = store.job(job)
    assert row is not None and row["state"] == "segmented" and row["segmented_at"] is not None
    assert json.loads(row["outputs"]) == outputs and json.loads(row["timings"]) == {"total": 1.5}
    assert [(d["destination"], d["state"]) for d in store.deliveries(job)] == [("archive", "pending"), ("pacs", "pending")]
    assert [d["job_id"] for d in store.due_deliveries("pacs")] == [job]  # due at once
    assert json.loads(store.due_deliveries("pacs")[0]["outputs"]) == outputs
    assert store.delivered(job, "pacs") is False
    assert job_state(store, job) == "segmented"
    assert store.due_deliveries("pacs") == [] and len(store.due_deliveries("archive")) == 1
    assert store.delivered(job, "archive") is True
    row = store.job(job)
    assert row is not None and row["state"] == "sent" and row["sent_at"] is not None
    assert {d["state"] for d in store.deliveries(job)} == {"sent"}
    assert store.next_delivery_at("pacs") is None


def test_delivery_backoff_doubles_up_to_its_cap_and_holds_the_delivery_back(store: Store) -> None:
    job = queued_job(store, "1.1")
    store.claim(stat_only=False)
    store.segmented(job, [], {}, {}, ("pacs",))
    before = time.time()
    delays = [store.delivery_failed(job, "pacs", "association rejected", 30.0, 200.0) for _ in range(5)]
    assert delays == [30.0, 60.0, 120.0, 200.0, 200.0]
    (d,) = store.deliveries(job)
    assert (d["state"], d["attempts"], d["error"]) == ("pending", 5, "association rejected")
    assert before + 200.0 <= d["next_attempt"] <= time.time() + 200.0
    assert store.next_delivery_at("pacs") == d["next_attempt"]
    assert store.due_deliveries("pacs") == []  # in its backoff
    assert store.retry(job) == f"job {job}: 1 pending delivery due now"
    assert [r["job_id"] for r in store.due_deliveries("pacs")] == [job]
    assert job_state(store, job) == "segmented"


def test_due_deliveries_stat_first(store: Store) -> None:
    routine = queued_job(store, "1.1", "routine")
    stat = queued_job(store, "1.2", "stat")
    for job in (routine, stat):
        store.segmented(job, [], {}, {}, ("pacs",))
    assert [r["job_id"] for r in store.due_deliveries("pacs")] == [stat, routine]
    assert store.due_deliveries("elsewhere") == []


def test_retry_queues_a_failed_job_with_fresh_attempts(store: Store) -> None:
    job = queued_job(store, "1.1")
    for _ in range(3):
        store.claim(stat_only=False)
        store.job_failed(job, "boom", final=False)
    store.claim(stat_only=False)
    store.job_failed(job, "boom", final=True)
    assert store.retry(job) == f"job {job} queued again"
    row = store.job(job)
    assert row is not None and (row["state"], row["attempts"], row["error"]) == ("queued", 0, None)
    assert store.retry(job) == f"job {job} is queued: nothing to retry"
    assert store.retry(12345) == "no job 12345"


def test_a_second_store_on_the_same_file_sees_the_writes(store: Store) -> None:
    other = Store(store.path)  # as `medseg jobs` opens it while the node runs
    try:
        assert store.query("PRAGMA journal_mode")[0][0] == "wal"
        job = queued_job(store, "1.1")
        row = other.job(job)
        assert row is not None and row["state"] == "queued"
        assert other.retry(job) == f"job {job} is queued: nothing to retry"
        claimed = store.claim(stat_only=False)
        assert claimed is not None and other.job(job)["state"] == "running"  # type: ignore[index]
        store.job_failed(job, "x", final=True)
        assert other.retry(job) == f"job {job} queued again"  # the other process writes, the node sees it
        assert job_state(store, job) == "queued"
        store.count("refused_instances")
        other.count("refused_instances", 2)
        assert store.query("SELECT count FROM events WHERE kind = 'refused_instances'")[0][0] == 3
    finally:
        other.close()
    plain = sqlite3.connect(store.path)
    try:
        assert plain.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    finally:
        plain.close()


def test_a_failed_transaction_changes_nothing(store: Store) -> None:
    add(store, "1.1")
    with pytest.raises(RuntimeError), store.tx() as db:
        db.execute("UPDATE series SET state = 'skipped'")
        raise RuntimeError("midway")
    row = store.series_row("1.2.3.1")
    assert row is not None and row["state"] == "receiving"
    add(store, "1.2")  # the store is still usable
    row = store.series_row("1.2.3.1")
    assert row is not None and row["instances"] == 2


# --- the audit trail ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"])
def test_the_audit_refuses_identifying_fields(tmp_path: Path, field: str) -> None:
    audit = Audit(tmp_path / "audit.jsonl")
    try:
        with pytest.raises(ValueError, match=field):
            audit("received", series_instance_uid="1.2", **{field: "DOE^JANE"})
    finally:
        audit.close()
    assert (tmp_path / "audit.jsonl").read_text() == ""


def test_audit_lines_are_json_and_a_torn_last_line_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "audit.jsonl"
    audit = Audit(path)
    audit("receiving", series_instance_uid="1.2.3", priority="stat")
    audit("segmented", job=7, timings={"total": 1.25}, path=Path("/x"))
    audit.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records] == ["receiving", "segmented"]
    assert records[0]["priority"] == "stat" and records[1]["timings"] == {"total": 1.25} and records[1]["path"] == "/x"
    for r in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]), r["time"]
    with path.open("a") as f:
        f.write('{"time": "2024-01-01T00:00:00.000Z", "event": "sen')  # a crash mid-write
    assert read_audit(path) == records
    again = Audit(path)  # appending after a restart keeps what was there
    again("recovered", job=7)
    again.close()
    assert [r["event"] for r in read_audit(path)] == ["receiving", "segmented", "recovered"]
    assert read_audit(tmp_path / "none.jsonl") == []


# --- metrics -----------------------------------------------------------------------------------------------------
def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    line = f"{name}{{{want}}} " if labels else f"{name} "
    found = [row for row in text.splitlines() if row.startswith(line)]
    assert len(found) == 1, (line, found)
    return float(found[0][len(line):])


def test_metrics_queue_depth_jobs_and_deliveries(store: Store) -> None:
    for i in range(2):
        queued_job(store, f"1.{i}", "routine")
    queued_job(store, "2.1", "stat")
    running = queued_job(store, "2.2", "stat")
    assert store.claim(stat_only=True) is not None  # the older STAT job, 2.1
    store.claim(stat_only=True)  # 2.2
    store.job_failed(running, "x", final=False)
    add(store, "3.1", "3.3.3")
    store.skip_series("3.3.3", "no")
    store.count("refused_instances", 4)
    text = render(store)
    assert metric(text, "medseg_node_queue_depth", priority="stat") == 1
    assert metric(text, "medseg_node_queue_depth", priority="routine") == 2
    assert metric(text, "medseg_node_jobs", state="queued", priority="routine") == 2
    assert metric(text, "medseg_node_jobs", state="running", priority="stat") == 1
    assert metric(text, "medseg_node_series", state="routed") == 4
    assert metric(text, "medseg_node_series", state="skipped") == 1
    assert metric(text, "medseg_node_stored_bytes") == 500
    assert metric(text, "medseg_node_events_total", kind="refused_instances") == 4
    assert "medseg_node_deliveries_pending{" not in text
    assert text.endswith("\n")
    for line in text.splitlines():  # every sample line is "name{labels} value"
        assert line.startswith("# ") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? -?[0-9.]+", line), line


def test_metrics_histograms_are_cumulative_and_inf_is_the_count(store: Store) -> None:
    totals = [0.3, 3.0, 100.0, 5000.0]
    ids = []
    for i, total in enumerate(totals):
        job = queued_job(store, f"1.{i}", "routine")
        store.claim(stat_only=False)
        store.segmented(job, [], {}, {}, ("pacs",))
        store.delivered(job, "pacs")
        ids.append(job)
        with store.tx() as db:  # the stages' timestamps as a real run would have left them
            db.execute("UPDATE jobs SET received_at = 1000, queued_at = 1001, started_at = 1002, segmented_at = 1003, "
                       "sent_at = ? WHERE id = ?", (1000 + total, job))
    stat = queued_job(store, "2.1", "stat")  # queued only: no stage ended, counted nowhere
    text = render(store)
    count = metric(text, "medseg_node_stage_seconds_count", stage="total", priority="routine")
    assert count == 4
    assert metric(text, "medseg_node_stage_seconds_bucket", stage="total", priority="routine", le="+Inf") == count
    assert metric(text, "medseg_node_stage_seconds_sum", stage="total", priority="routine") == pytest.approx(sum(totals))
    buckets = [metric(text, "medseg_node_stage_seconds_bucket", stage="total", priority="routine", le=str(b))
               for b in BUCKETS]
    assert buckets == [sum(t <= b for t in totals) for b in BUCKETS]
    assert buckets == sorted(buckets) and buckets[0] == 1 and buckets[-1] == 3  # 5000 s is only under +Inf
    assert metric(text, "medseg_node_stage_seconds_bucket", stage="total", priority="routine", le="5") == 2
    assert metric(text, "medseg_node_stage_seconds_count", stage="queued", priority="routine") == 4
    assert metric(text, "medseg_node_stage_seconds_bucket", stage="queued", priority="routine", le="1") == 4
    assert metric(text, "medseg_node_stage_seconds_count", stage="total", priority="stat") == 0
    assert metric(text, "medseg_node_stage_seconds_bucket", stage="total", priority="stat", le="+Inf") == 0
    assert metric(text, "medseg_node_queue_depth", priority="stat") == 1 and stat not in ids
    assert metric(text, "medseg_node_jobs", state="sent", priority="routine") == 4


def test_metrics_pending_deliveries_per_destination(store: Store) -> None:
    job = queued_job(store, "1.1")
    store.segmented(job, [], {}, {}, ("pacs", 'odd "name"'))
    text = render(store)
    assert metric(text, "medseg_node_deliveries_pending", destination="pacs") == 1
    assert metric(text, "medseg_node_deliveries_pending", destination='odd \\"name\\"') == 1


# --- medseg jobs -------------------------------------------------------------------------------------------------
@pytest.fixture()
def config(tmp_path: Path) -> NodeConfig:
    return parse_config(minimal_doc(str(tmp_path / "storage")))


def test_jobs_without_a_store_names_the_path(config: NodeConfig) -> None:
    with pytest.raises(MedsegError) as e:
        jobs_command(config, "list", None, None, 50)
    assert str(config.db_path) in str(e.value) and "\n" not in str(e.value)
    assert not config.db_path.exists()  # looking does not create it


def test_jobs_list_show_and_retry(config: NodeConfig) -> None:
    store = Store(config.db_path)
    try:
        sent = queued_job(store, "1.1", "stat")
        store.claim(stat_only=False)
        store.segmented(sent, [{"kind": "SEG"}], {"total": 2.0}, {"liver_ml": 1.0}, ("pacs",))
        store.delivered(sent, "pacs")
        failed = queued_job(store, "1.2", "routine")
        store.claim(stat_only=False)
        store.job_failed(failed, "the series is not a CT volume", final=True)
        add(store, "9.1", "9.9.9")
        store.skip_series("9.9.9", "a localizer")
    finally:
        store.close()

    lines = jobs_command(config, "list", None, None, 50).splitlines()
    assert lines[0].split()[:4] == ["job", "state", "priority", "model"]
    assert lines[1].split()[:3] == [str(failed), "failed", "routine"] and lines[1].endswith("the series is not a CT volume")
    assert lines[2].split()[:3] == [str(sent), "sent", "stat"] and lines[2].endswith("1.1")
    assert lines[3] == "series not made into jobs: 1 skipped (reasons in the audit trail)"
    only_sent = jobs_command(config, "list", None, "sent", 50).splitlines()
    assert len(only_sent) == 3 and only_sent[1].split()[:2] == [str(sent), "sent"]
    assert len(jobs_command(config, "list", None, None, 1).splitlines()) == 3  # header, newest job, skipped line

    doc = json.loads(jobs_command(config, "show", sent, None, 50))
    assert (doc["id"], doc["state"], doc["priority"], doc["series_uid"]) == (sent, "sent", "stat", "1.1")
    assert doc["outputs"] == [{"kind": "SEG"}] and doc["timings"] == {"total": 2.0} and doc["summary"] == {"liver_ml": 1.0}
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", doc["sent_at"])
    assert [(d["destination"], d["state"]) for d in doc["deliveries"]] == [("pacs", "sent")]
    assert "job_id" not in doc["deliveries"][0]
    failed_doc = json.loads(jobs_command(config, "show", failed, None, 50))
    assert failed_doc["sent_at"] == "-" and failed_doc["outputs"] is None and failed_doc["deliveries"] == []

    with pytest.raises(MedsegError, match="no job 999"):
        jobs_command(config, "show", 999, None, 50)
    with pytest.raises(MedsegError, match="needs a job number"):
        jobs_command(config, "show", None, None, 50)
    assert jobs_command(config, "retry", failed, None, 50) == f"job {failed} queued again"
    assert jobs_command(config, "list", None, "failed", 50).splitlines()[1:] == [
        "series not made into jobs: 1 skipped (reasons in the audit trail)"]
    assert json.loads(jobs_command(config, "show", failed, None, 50))["state"] == "queued"


def test_medseg_jobs_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg_client.cli import main

    path = node_config(tmp_path, "localhost:8001", 11112, {"pacs": ("PACS", 4242)})
    Store(load_config(path).db_path).close()  # the node has run once: its store exists, with no jobs yet
    capsys.readouterr()
    assert main(["jobs", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split()[:3] == ["job", "state", "priority"] and len(out.splitlines()) == 1
    assert err == ""

    absent = tmp_path / "absent.yaml"
    assert main(["jobs", "--config", str(absent)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and str(absent) in err and "Traceback" not in err

    assert main(["jobs", "show", "5", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "no job 5" in err


# --- the receiver's files ----------------------------------------------------------------------------------------
def test_safe_name_keeps_a_uid_and_hashes_anything_else() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    assert safe_name(uid) == uid
    for other in ("../../etc/passwd", "1.2.3/4", "", "1..2", "1.2.", "ABC", "1" * 65, "1.2 3", "1.2.3\n"):
        name = safe_name(other)
        assert re.fullmatch(r"x[0-9a-f]{32}", name), (other, name)
        assert safe_name(other) == name  # the same every time: instances of a series land in one folder
    assert safe_name("1.2.3/4") != safe_name("1.2.3/5")
    assert safe_name("1" * 64) == "1" * 64


def test_write_durably_leaves_the_whole_file_and_no_part_file(tmp_path: Path) -> None:
    path = tmp_path / "incoming" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    data = bytes(range(256)) * 4096  # 1 MiB
    write_durably(path, data)
    assert path.read_bytes() == data
    write_durably(path, b"replaced")
    assert path.read_bytes() == b"replaced"
    write_durably(path.with_name("empty.dcm"), b"")
    assert path.with_name("empty.dcm").read_bytes() == b""
    assert sorted(p.name for p in path.parent.iterdir()) == ["1.2.3.4.dcm", "empty.dcm"]  # no .part left behind
