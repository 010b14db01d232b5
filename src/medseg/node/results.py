"""One job's work: read the received series, segment it through the server, write the DICOM objects that go back
(SEG, SR measurement report, preview as Secondary Capture) into the job's outbox folder, all or nothing.

The objects' series and instance UIDs derive from the study, the series, the model and its version: a job run
twice (a retry, a node killed mid-job) makes objects with the same UIDs, so the PACS keeps one copy.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from medseg_client.client import SegmentationClient
from medseg_client.io.studies import read_study

OBJECTS = ("seg", "sr", "preview")


def result_uids(study_uid: str, series_uid: str, model: str, version: str) -> dict[str, tuple[str, str]]:
    """(series UID, SOP instance UID) of each object this job sends: the same for every run of the job."""
    from medseg_client.io.uids import derived_uid

    return {kind: (derived_uid(study_uid, series_uid, model, version, kind, "series"),
                   derived_uid(study_uid, series_uid, model, version, kind, "instance")) for kind in OBJECTS}


def make_results(folder: Path, outbox: Path, session: SegmentationClient, send_preview: bool = True) -> tuple[
        list[dict[str, str]], dict[str, float], dict[str, Any]]:
    """Segment the series in ``folder``; write its objects to ``outbox`` (a new folder, renamed into place when
    all are written). Returns the objects (kind, path, SOP instance UID), the timings and a summary of the
    findings (no patient identifiers)."""
    from medseg_client.io.preview import write_preview
    from medseg_client.io.sc import build_preview_sc
    from medseg_client.io.seg import build_seg, source_headers
    from medseg_client.io.sr import build_sr
    from medseg_client.segment import findings_document

    t0 = time.perf_counter()
    study = read_study(folder)
    t_read = time.perf_counter() - t0
    card = session.card()
    result = session.segment(study.ct, study.spacing)
    t_segment = time.perf_counter() - t0 - t_read
    provenance = result.findings.get("model", {})
    version = f"{provenance.get('version', '?')}:{provenance.get('weights_sha256', provenance.get('onnx_sha256', ''))}"
    headers = source_headers(study.dicom_headers or study.dicom_files)
    first = headers[0]
    uids = result_uids(str(first.StudyInstanceUID), study.series_uid, session.model_name, version)
    staging = outbox.with_name(outbox.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        native = study.to_native(result.labels)
        seg = build_seg(study.dicom_headers or study.dicom_files, native, provenance, study.frame_indices, card.labels,
                        card.description, series_instance_uid=uids["seg"][0], sop_instance_uid=uids["seg"][1])
        doc = findings_document(study, folder, result.findings, {})
        sr = build_sr(seg, headers, doc, provenance, series_instance_uid=uids["sr"][0], sop_instance_uid=uids["sr"][1])
        objects = [("seg", seg), ("sr", sr)]
        if send_preview:
            png = staging / "preview.png"
            write_preview(png, study.ct, result.labels, study.spacing, result.findings, card.labels)
            objects.append(("preview", build_preview_sc(png, headers, series_instance_uid=uids["preview"][0],
                                                        sop_instance_uid=uids["preview"][1])))
            png.unlink()
        for kind, ds in objects:
            ds.save_as(staging / f"{kind}.dcm", enforce_file_format=True)
        (staging / "findings.json").write_text(json.dumps(doc, indent=2) + "\n")
        if outbox.exists():
            shutil.rmtree(outbox)
        staging.rename(outbox)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    status = result.findings.get("status", {})
    summary = {"status": status.get("code"), "reported": status.get("reported"), "reason": status.get("reason"),
               "liver_ml": result.findings.get("liver", {}).get("volume_ml"),
               "tumors": len(result.findings.get("tumors", [])), "model_version": version,
               "slices": int(study.ct.shape[0])}
    outputs = [{"kind": kind, "path": str(outbox / f"{kind}.dcm"), "sop_instance_uid": uids[kind][1]}
               for kind, _ in objects]
    timings = {"read_s": round(t_read, 3), "segment_s": round(t_segment, 3),
               "objects_s": round(time.perf_counter() - t0 - t_read - t_segment, 3)}
    return outputs, timings, summary
