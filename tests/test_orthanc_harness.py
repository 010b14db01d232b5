"""The Orthanc harness (tests/orthanc.py) against Debian's real Orthanc: upload, C-STORE from one PACS to another,
and storage that survives a restart. Skipped with the reason where Orthanc is not installed."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from tests.orthanc import Orthanc, OrthancError, orthanc_missing, stop_all

pytestmark = pytest.mark.skipif(orthanc_missing() is not None, reason=str(orthanc_missing()))

SLICES = 8


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[Path]]:
    """A small CT series on disk: its StudyInstanceUID, SeriesInstanceUID and files."""
    from medseg.synth.phantom import generate
    from medseg_client.io.studies import write_dicom_series

    ph = generate(17, num_slices=SLICES, slice_thickness=4.0)
    paths = write_dicom_series(ph, tmp_path_factory.mktemp("series"))
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID), paths


def test_upload_store_to_another_orthanc_and_restart(tmp_path: Path, series: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, paths = series
    a, b = Orthanc(tmp_path / "a", aet="PACS_A"), Orthanc(tmp_path / "b", aet="PACS_B")
    try:
        a.start()
        b.start()
        assert len({a.http_port, a.dicom_port, b.http_port, b.dicom_port}) == 4

        ids = a.upload(paths)
        assert len(set(ids)) == SLICES
        assert a.upload(paths[:1]) == ids[:1]  # the same file again: AlreadyStored, same id
        [s] = a.series_in_study(study_uid)
        assert (s["MainDicomTags"]["SeriesInstanceUID"], s["MainDicomTags"]["Modality"]) == (series_uid, "CT")
        assert s["InstanceCount"] == SLICES
        assert a.study_by_uid("1.2.3.4.5.6.7.8.9") is None
        assert a.series_in_study("1.2.3.4.5.6.7.8.9") == []

        # B is known to A only once B has its port
        a.add_modality("b", b.aet, "127.0.0.1", b.dicom_port)
        a.echo("b")
        study = a.study_by_uid(study_uid)
        assert study is not None and a.studies() == [study]
        assert b.study_by_uid(study_uid) is None
        sent = a.store_to("b", study)  # synchronous: every C-STORE answered before it returns
        assert (sent["InstancesCount"], sent["FailedInstancesCount"]) == (SLICES, 0), sent
        [got] = b.series_in_study(study_uid)
        assert got["InstanceCount"] == SLICES
        instances = b.instances_of_series(got["ID"])
        assert [int(i["MainDicomTags"]["InstanceNumber"]) for i in instances] == list(range(1, SLICES + 1))
        # A keeps the uploaded file byte for byte; B's has the same data set (no transcoding: explicit VR little
        # endian both ways) under the file meta of its receiver (DCMTK's implementation UID and version)
        assert a.instance_file(ids[0]) == paths[0].read_bytes()
        given = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, paths)}
        for i in instances:
            stored = pydicom.dcmread(io.BytesIO(b.instance_file(i["ID"])))
            assert stored == given[str(stored.SOPInstanceUID)]
            assert stored.file_meta.TransferSyntaxUID == given[str(stored.SOPInstanceUID)].file_meta.TransferSyntaxUID

        # an asynchronous store is a job, polled until done
        job = a.store_to("b", s["ID"], synchronous=False)
        assert a.wait_job(job["ID"])["State"] == "Success"

        # a restart keeps the ports, the modalities added meanwhile and the stored study
        ports = (a.http_port, a.dicom_port)
        a.restart()
        assert (a.http_port, a.dicom_port) == ports
        [kept] = a.series_in_study(study_uid)
        assert kept["InstanceCount"] == SLICES
        assert a.store_to("b", study)["InstancesCount"] == SLICES

        b.delete_all()
        assert b.studies() == []
    finally:
        stop_all(a, b)
    assert not a.running and not b.running


def test_errors_say_what_came(tmp_path: Path) -> None:
    with Orthanc(tmp_path / "c") as c:
        with pytest.raises(OrthancError, match=r"POST .*/modalities/nowhere/store: HTTP 404 Not Found: Unknown resource"):
            c.store_to("nowhere", "6f2dfbb8-6375fa5f-206433ef-a251a977-81959fd0")
        with pytest.raises(OrthancError, match=r"/instances/nothing/file: HTTP 404"):
            c.instance_file("nothing")
        c.add_modality("dead", "NOBODY", "127.0.0.1", 9)  # discard port: nothing answers there
        with pytest.raises(OrthancError, match=r"/modalities/dead/echo: HTTP 500.*Connection refused"):
            c.echo("dead", timeout_s=2)
        # a port taken: by another Orthanc's HTTP server (it answers, as someone else), by its DICOM server
        with pytest.raises(OrthancError, match=r"something else answers on http port \d+: expected Orthanc X"):
            Orthanc(tmp_path / "e", aet="X", http_port=c.http_port).start()
        with pytest.raises(OrthancError, match=r"exited \(\d+\) before answering(.|\n)*log "):
            Orthanc(tmp_path / "f", aet="Y", dicom_port=c.dicom_port).start()
    with pytest.raises(OrthancError, match="call start"):
        _ = Orthanc(tmp_path / "d").url
