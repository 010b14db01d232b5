"""``medseg segment``: read a study, segment it through the server, write the outputs all or nothing."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from medseg_client.client import SegmentationClient
from medseg_client.errors import MedsegError
from medseg_client.io.preview import write_preview
from medseg_client.io.seg import write_seg
from medseg_client.io.studies import Study, read_study, save_nifti

LABELS_FILE = "labels.nii.gz"
FINDINGS_FILE = "findings.json"
PREVIEW_FILE = "preview.png"
SEG_FILE = "seg.dcm"


def findings_document(study: Study, source: Path, result_findings: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The findings.json record: provenance, the study's geometry, findings with patient coordinates, timings."""
    findings = dict(result_findings)
    model = findings.pop("model", {})
    for tumor in findings.get("tumors", []):
        tumor["centroid_lps_mm"] = study.lps_mm(tumor["centroid_voxel_zyx"])
    return {
        "model": model,
        "input": {"name": source.name, "format": study.source, "series_instance_uid": study.series_uid or None,
                  "shape_zyx": list(study.ct.shape),
                  "spacing_zyx_mm": [round(s, 4) for s in study.spacing],
                  "header_repairs": list(study.repairs)},
        "findings": findings,
        "timings_s": timings,
    }


def check_out_dir(out: Path) -> None:
    """Refuse, before any work, an ``out`` that cannot become a folder of outputs."""
    if out.exists() and not out.is_dir():
        raise MedsegError(f"--out {out}: exists and is not a folder")
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MedsegError(f"--out {out}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MedsegError(f"--out {out}: {ancestor} is not writable")


def write_concurrently(writers: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Run each output's writer in its own thread (compression, PNG encoding and numpy release the GIL); the
    seconds each took. All are waited for; the first failure (in the writers' order) is raised."""
    def timed(write: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        write()
        return time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=len(writers), thread_name_prefix="medseg-write") as pool:
        futures = {name: pool.submit(timed, write) for name, write in writers.items()}
        return {name: f.result() for name, f in futures.items()}


def segment_to_dir(url: str, source: Path, out: Path, model_name: str, timeout_s: float,
                   series_uid: str | None = None, **client: Any) -> dict[str, Any]:
    """Segment ``source`` (DICOM folder or NIfTI); write labels.nii.gz, findings.json, preview.png and, for
    DICOM input, seg.dcm into ``out``. ``client`` are SegmentationClient's transport options
    (shared_memory, tenant_key, tls_ca, admin_key).

    Outputs are staged in a temporary folder beside ``out`` and moved in only when all are written (a new
    ``out`` is the staging folder renamed); whatever fails on the way, the staging folder is removed.
    """
    t0 = time.perf_counter()
    check_out_dir(out)
    study = read_study(source, series_uid)
    if study.note:
        print(f"reading {study.note}", flush=True)
    for repair in study.repairs:
        print(f"note: header repaired: {repair}", flush=True)
    t_read = time.perf_counter() - t0
    with SegmentationClient(url, model_name=model_name, timeout_s=timeout_s, **client) as session:
        card = session.card()  # the labels' names, colours and DICOM codes, as the server has them
        result = session.segment(study.ct, study.spacing)
    t1 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".medseg-{secrets.token_hex(8)}"  # the usual mode: a new out is this folder renamed
    staging.mkdir()
    try:
        native = study.to_native(result.labels)
        writers: dict[str, Callable[[], None]] = {
            "labels": lambda: save_nifti(native, study.native_affine_ras, staging / LABELS_FILE),
            "preview": lambda: write_preview(staging / PREVIEW_FILE, study.ct, result.labels, study.spacing,
                                             result.findings, card.labels)}
        if study.source == "dicom" and card.uncoded():
            print(f"note: no {SEG_FILE}: {card.name}'s card has no DICOM codes for {', '.join(card.uncoded())} "
                  "(import it with --label-codes)", flush=True)
        elif study.source == "dicom":
            writers["seg"] = lambda: write_seg(staging / SEG_FILE, study.dicom_headers or study.dicom_files, native,
                                               result.findings.get("model", {}), study.frame_indices, card.labels,
                                               card.description)
        output_s = write_concurrently(writers)
        timings = {"read_study_s": round(t_read, 3), **result.timings_s,
                   "write_outputs_s": round(time.perf_counter() - t1, 3),
                   **{f"write_{name}_s": round(t, 3) for name, t in output_s.items()}}
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        doc = findings_document(study, source, result.findings, timings)
        (staging / FINDINGS_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        if out.is_dir():
            for f in staging.iterdir():
                f.replace(out / f.name)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return doc
