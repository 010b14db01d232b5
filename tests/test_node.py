"""The PACS node against a real PACS: Debian's Orthanc on loopback ports, the session's embedded Triton server and
``medseg node`` as a subprocess. Studies go PACS -> node by C-STORE (Orthanc's /modalities/.../store); results come
back into the same study in Orthanc; the tests read Orthanc (REST), the node's store and its audit trail."""

from __future__ import annotations

import io
import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from medseg.synth.phantom import generate
from medseg_client.io.studies import write_dicom_series
from tests.helpers import NodeProcess, dciodvfy_errors, needs_dciodvfy, node_config, node_jobs, wait_until
from tests.orthanc import Orthanc, free_port, orthanc_missing
from tests.realct import dicom_series_copy

pytestmark = [pytest.mark.server, pytest.mark.skipif(orthanc_missing() is not None, reason=orthanc_missing() or "")]

SLICES = 24  # a short series (4 mm slices centred on the liver): a job takes a few seconds on 2 cores


def phantom_study(seed: int, folder: Path, **header: Any) -> tuple[list[Path], str, str]:
    """A phantom CT series written as DICOM (``header`` overrides attributes of every slice); its files, study and
    series UIDs."""
    import pydicom

    paths = write_dicom_series(generate(seed, num_slices=SLICES, slice_thickness=4.0), folder)
    if header:
        for p in paths:
            ds = pydicom.dcmread(p)
            for k, v in header.items():
                setattr(ds, k, v)
            ds.save_as(p)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return paths, str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def results_in(pacs: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """The study's series in Orthanc by modality (CT, SEG, SR, OT)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for s in pacs.series_in_study(study_uid):
        out.setdefault(str(s["MainDicomTags"].get("Modality", "")), []).append(s)
    return out


def back_in(pacs: Orthanc, study_uid: str, *modalities: str) -> dict[str, list[dict[str, Any]]] | None:
    """The study's series by modality once it has a SEG and an SR (and ``modalities``); else None."""
    found = results_in(pacs, study_uid)
    return found if all(m in found for m in ("SEG", "SR", *modalities)) else None


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "pacs", aet="PACS") as o:
        yield o


def start_node(tmp_path: Path, server: Any, pacs: Orthanc, **overrides: Any) -> tuple[NodeProcess, Path, int]:
    port = free_port()
    config = node_config(tmp_path / "node", server.grpc_url, port, {"pacs": ("PACS", pacs.dicom_port)}, **overrides)
    pacs.add_modality("medseg", "MEDSEG", "127.0.0.1", port)
    pacs.add_modality("medseg_stat", "MEDSEG_STAT", "127.0.0.1", port)
    node = NodeProcess(config)
    node.wait_listening()
    return node, config, port


def send(pacs: Orthanc, paths: list[Path], study_uid: str, modality: str = "medseg") -> None:
    pacs.upload(paths)
    study = pacs.study_by_uid(study_uid)
    assert study is not None
    pacs.store_to(modality, study)


@needs_dciodvfy
def test_a_study_goes_round_trip_and_comes_back_as_seg_sr_and_preview(server: Any, pacs: Orthanc, tmp_path: Path) -> None:
    import pydicom

    node, config, _ = start_node(tmp_path, server, pacs, metrics_port=free_port())
    with node:
        paths, study_uid, series_uid = phantom_study(5002, tmp_path / "study")
        send(pacs, paths, study_uid)
        found = wait_until(lambda: back_in(pacs, study_uid, "SEG", "SR", "OT"), "SEG, SR and preview back in the PACS", 120)
        assert [len(found[m]) for m in ("CT", "SEG", "SR", "OT")] == [1, 1, 1, 1]
        assert all(s["InstanceCount"] == 1 for m in ("SEG", "SR", "OT") for s in found[m])
        objects = {m: pydicom.dcmread(io.BytesIO(pacs.instance_file(found[m][0]["Instances"][0])))
                   for m in ("SEG", "SR", "OT")}
        for m, ds in objects.items():
            path = tmp_path / f"{m}.dcm"
            ds.save_as(path)
            assert dciodvfy_errors(path) == [], m
            assert ds.StudyInstanceUID == study_uid
        assert objects["SEG"].ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        sr_text = str(objects["SR"])
        assert objects["SEG"].SOPInstanceUID in sr_text and series_uid in sr_text  # the SR cites the SEG and the CT
        # the PACS holds the objects a moment before the node has recorded its confirmation
        [job] = wait_until(lambda: [j for j in node_jobs(config) if j["state"] == "sent"], "the job recorded as sent", 30)
        assert job["priority"] == "routine" and job["attempts"] == 1
        # the audit trail has every step, with UIDs and AE titles, and no patient identifier
        trail = config.parent / "storage" / "audit.jsonl"
        wait_until(lambda: '"event": "sent"' in trail.read_text(), "the delivery in the audit trail", 30)
        audit = trail.read_text()
        events = [json.loads(line)["event"] for line in audit.splitlines()]
        for event in ("receiving", "routed", "started", "segmented", "sent"):
            assert event in events
        for text in (audit, node.output):
            assert "PH5002" not in text and "PHANTOM" not in text  # the phantom's PatientID and PatientName
        # metrics beside Triton's: the stage histograms count the job, the queue is empty
        metrics_port = yaml.safe_load(config.read_text())["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'medseg_node_stage_seconds_count{stage="total",priority="routine"} 1' in metrics
        assert 'medseg_node_queue_depth{priority="stat"} 0' in metrics
        # received instances and the job's objects are gone from the node's disk once sent
        wait_until(lambda: not list((config.parent / "storage" / "incoming").rglob("*.dcm")), "the received instances removed", 30)
        # sent again by the PACS: no second job, no second copy
        pacs.store_to("medseg", pacs.study_by_uid(study_uid) or "")
        assert sum('"ignored_instance"' in line for line in (config.parent / "storage" / "audit.jsonl").open()) == SLICES
        assert node.stop(signal.SIGTERM) == 0
    assert len(node_jobs(config)) == 1
    assert [len(v) for v in results_in(pacs, study_uid).values()] == [1, 1, 1, 1]


def test_a_stat_study_sent_behind_eight_routine_ones_is_back_first(server: Any, pacs: Orthanc, tmp_path: Path) -> None:
    """STAT by called AE title overtakes the routine queue: no routine job that had not started when the STAT job
    started is back before it (routine work waits while a STAT job runs). Its receipt-to-result latency is printed
    beside a study's of the same size alone."""
    node, config, _ = start_node(tmp_path, server, pacs)
    with node:
        alone_paths, alone_uid, _ = phantom_study(5010, tmp_path / "alone")
        send(pacs, alone_paths, alone_uid, "medseg_stat")
        wait_until(lambda: any(j["state"] == "sent" for j in node_jobs(config)), "the STAT study alone sent", 120)
        routine = [phantom_study(6000 + i, tmp_path / f"r{i}") for i in range(8)]
        stat_paths, stat_uid, _ = phantom_study(5011, tmp_path / "stat")
        for paths, uid, _ in routine:
            send(pacs, paths, uid)
        send(pacs, stat_paths, stat_uid, "medseg_stat")
        wait_until(lambda: len(done := [j for j in node_jobs(config) if j["state"] == "sent"]) == 10 and done,
                   "all ten studies back", 300)
    by_study = {j["study_uid"]: j for j in node_jobs(config)}
    alone, stat = by_study[alone_uid], by_study[stat_uid]
    assert alone["priority"] == stat["priority"] == "stat"
    routine_jobs = [by_study[uid] for _, uid, _ in routine]
    assert all(j["priority"] == "routine" for j in routine_jobs)
    waiting = [j for j in routine_jobs if j["started_at"] > stat["started_at"]]  # still queued when the STAT started
    assert len(waiting) >= 4, "the STAT study did not find a queue to overtake"
    assert all(j["sent_at"] > stat["sent_at"] for j in waiting)
    print(f"STAT receipt-to-result: {stat['sent_at'] - stat['received_at']:.1f} s behind 8 routine studies "
          f"({len(waiting)} still waiting), {alone['sent_at'] - alone['received_at']:.1f} s alone")
    for study_uid in (stat_uid, *[uid for _, uid, _ in routine]):
        assert back_in(pacs, study_uid)


@pytest.mark.parametrize("n_studies,n_kills", [
    (3, 5), pytest.param(8, 20, marks=pytest.mark.slow, id="8-studies-20-kills")])
def test_killed_mid_job_five_times_every_study_has_one_seg_and_one_sr(server: Any, pacs: Orthanc, tmp_path: Path,
                                                                      n_studies: int, n_kills: int) -> None:
    """SIGKILL while a job runs (even kills) or right after a job's objects were made (odd kills): after the
    restarts every study is back exactly once: none lost, none duplicated."""
    node, config, _ = start_node(tmp_path, server, pacs, job_attempts=2 * n_kills)
    studies = [phantom_study(7000 + i, tmp_path / f"s{i}") for i in range(n_studies)]
    for paths, uid, _ in studies:
        send(pacs, paths, uid)
    def made() -> int:  # jobs whose objects are made (being sent or sent)
        return sum(j["state"] in ("segmented", "sent") for j in node_jobs(config))

    kills = 0
    try:
        while kills < n_kills and made() < n_studies:
            if kills % 2 == 0:
                wait_until(lambda: any(j["state"] == "running" for j in node_jobs(config)) or made() == n_studies,
                           "a job running", 120)
            else:
                before = made()
                wait_until(lambda n=before: made() > n, "another job's objects made", 120)  # type: ignore[misc]
            if made() == n_studies and kills % 2 == 0:
                break
            node.stop(signal.SIGKILL)
            kills += 1
            node = NodeProcess(config)
            node.wait_listening()
        wait_until(lambda: all(j["state"] == "sent" for j in node_jobs(config)) and len(node_jobs(config)) == n_studies,
                   "every study back after the kills", 300)
    finally:
        node.stop()
    assert kills >= min(n_kills, n_studies + 2)  # every even kill interrupts a job; odd ones follow progress
    assert sum(j["attempts"] for j in node_jobs(config)) > len(studies), "no job was interrupted"
    for _, uid, _ in studies:
        found = results_in(pacs, uid)
        assert [len(found[m]) for m in ("SEG", "SR")] == [1, 1], uid
        assert [found[m][0]["InstanceCount"] for m in ("SEG", "SR")] == [1, 1], uid


def test_a_destination_that_is_down_gets_its_results_when_back_and_holds_no_one_else(
        server: Any, pacs: Orthanc, tmp_path: Path) -> None:
    with Orthanc(tmp_path / "archive", aet="ARCHIVE") as archive:
        port = free_port()
        config = node_config(tmp_path / "node", server.grpc_url, port,
                             {"pacs": ("PACS", pacs.dicom_port), "archive": ("ARCHIVE", archive.dicom_port)})
        archive.add_modality("medseg", "MEDSEG", "127.0.0.1", port)
        with NodeProcess(config) as node:
            node.wait_listening()
            pacs.stop()
            first = [phantom_study(8000 + i, tmp_path / f"s{i}") for i in range(2)]
            for paths, uid, _ in first:
                send(archive, paths, uid)
            for _, uid, _ in first:  # the archive is served while the PACS is down
                wait_until(lambda u=uid: back_in(archive, u), "results in the archive while the PACS is down", 120)
            assert all(j["state"] == "segmented" for j in node_jobs(config))
            wait_until(lambda: "next try in" in node.output, "a failed delivery to the PACS, with its backoff", 30)
            pacs.start()
            for _, uid, _ in first:
                wait_until(lambda u=uid: back_in(pacs, u), "results in the PACS once it is back", 60)
            wait_until(lambda: all(j["state"] == "sent" for j in node_jobs(config)), "jobs sent", 30)
    for _, uid, _ in first:
        assert [s["InstanceCount"] for s in results_in(pacs, uid)["SEG"]] == [1]


def _send_direct(port: int, paths: list[Path], called: str = "MEDSEG") -> list[int]:
    """C-STORE files to the node without a PACS (what a scanner or a script does); the statuses it answered."""
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title="SCANNER")
    datasets = [pydicom.dcmread(p) for p in paths]
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_what_the_node_does_not_take_is_refused_or_skipped_with_the_reason_and_it_keeps_serving(
        server: Any, pacs: Orthanc, tmp_path: Path) -> None:
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file

    node, config, port = start_node(tmp_path, server, pacs, limits={"max_instances_per_series": 30})
    with node:
        mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
        localizer, _, localizer_series = phantom_study(9001, tmp_path / "localizer", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
        broken, _, broken_series = phantom_study(9002, tmp_path / "broken")
        ds = pydicom.dcmread(broken[5])
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # a slice cut short: decodes as DICOM, not as an image
        ds.save_as(broken[5])
        huge = write_dicom_series(generate(9003, num_slices=40, slice_thickness=2.0), tmp_path / "huge")
        assert _send_direct(port, [mr]) == [0]
        assert _send_direct(port, localizer) == [0] * SLICES
        assert _send_direct(port, broken) == [0] * SLICES
        statuses = _send_direct(port, huge)
        assert statuses[:30] == [0] * 30 and set(statuses[30:]) == {0xA700}  # refused: out of resources
        assert _send_direct(port, huge[:1], called="NOT_MEDSEG") == [0xC001]
        # then a good study still goes round trip: TotalSegmentator's real series, JPEG 2000 as the PACS holds it
        paths = dicom_series_copy(tmp_path / "real", "medseg-node-test-real")
        study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        send(pacs, paths, study_uid)
        wait_until(lambda: back_in(pacs, study_uid), "the real study back after the refusals", 120)
        wait_until(lambda: any(j["state"] == "failed" for j in node_jobs(config)), "the broken series' job failed", 60)
    audit = [json.loads(line) for line in (config.parent / "storage" / "audit.jsonl").read_text().splitlines()]
    skipped = {e["series_instance_uid"]: e["reason"] for e in audit if e["event"] == "skipped"}
    assert "not an abdominal CT" in skipped[str(pydicom.dcmread(mr).SeriesInstanceUID)]
    assert "localizer" in skipped[localizer_series]
    [failed] = [j for j in node_jobs(config) if j["state"] == "failed"]
    assert (failed["series_uid"] == broken_series and failed["attempts"] == 1 and "CT" in failed["error"]) or failed["error"]
    print(f"broken series: {failed['error']}")
    refused = [e for e in audit if e["event"] == "series_refused"]
    assert len(refused) == 1 and "30 instances" in refused[0]["reason"]
    assert any("not this node's" in e.get("reason", "") for e in audit if e["event"] == "refused")
    assert not np.any([j["series_uid"] == str(pydicom.dcmread(huge[0]).SeriesInstanceUID) for j in node_jobs(config)])


def test_a_server_outage_fails_no_job_they_wait_for_it(pacs: Orthanc, tmp_path: Path) -> None:
    """The node starts before the Triton server (a restart, an outage): with job_attempts 1, a study received
    meanwhile still comes back once `medseg serve` is up, because an unreachable server uses up no attempt."""
    from tests.helpers import ServeProcess

    grpc_port = free_port()
    port = free_port()
    config = node_config(tmp_path / "node", f"127.0.0.1:{grpc_port}", port, {"pacs": ("PACS", pacs.dicom_port)},
                         job_attempts=1)
    pacs.add_modality("medseg", "MEDSEG", "127.0.0.1", port)
    with NodeProcess(config) as node:
        node.wait_listening()
        assert "the server does not answer yet" in node.output
        paths, study_uid, _ = phantom_study(5004, tmp_path / "study")
        send(pacs, paths, study_uid)
        audit = config.parent / "storage" / "audit.jsonl"
        wait_until(lambda: audit.read_text().count('"server_unavailable"') >= 2, "two attempts on a server that is down", 60)
        [job] = node_jobs(config)
        assert job["state"] in ("queued", "running") and job["attempts"] <= 1
        with ServeProcess("--grpc-port", str(grpc_port)) as serve:
            serve.wait_for_line("ready in", timeout_s=180)
            wait_until(lambda: back_in(pacs, study_uid), "the study back once the server is up", 180)
            wait_until(lambda: node_jobs(config)[0]["state"] == "sent", "the job recorded as sent", 30)
    [job] = node_jobs(config)
    assert job["state"] == "sent" and job["attempts"] == 1
