"""Server tier, real CT (`make realct`): `medseg segment` end to end on an anonymized clinical DICOM series
and on a CT NIfTI, through the installed entry point and the real server.

Checks what the command writes (labels on the input's grid and affine, findings with the header repairs, a
SEG that passes dciodvfy, the preview), not how well the model segments: accuracy on these studies is
asserted where the model's figures are kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg_client.io.studies import read_study
from medseg_client.spec import SPEC
from tests import realct
from tests.helpers import dciodvfy_errors, needs_dciodvfy

pytestmark = pytest.mark.server
ENTRY_POINT = Path(sys.executable).with_name("medseg")
MEDSEG = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "medseg_client.cli"]


def _segment(server: Any, source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*MEDSEG, "segment", "--url", server.grpc_url, str(source), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and "Traceback" not in r.stdout
    return r


def _check_common(out: Path, source: Path, study: Any) -> dict[str, Any]:
    """labels.nii.gz on the input's grid and affine, with the spec's labels; preview.png; findings.json."""
    from PIL import Image

    labels: Any = nib.load(str(out / "labels.nii.gz"))
    assert labels.shape == study.to_native(np.zeros(study.ct.shape, np.uint8)).shape
    np.testing.assert_allclose(labels.affine, study.native_affine_ras, atol=1e-3)
    values = np.unique(np.asanyarray(labels.dataobj))
    assert set(values.tolist()) <= {label.value for label in SPEC.labels}
    with Image.open(out / "preview.png") as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
    doc = json.loads((out / "findings.json").read_text())
    assert doc["input"]["name"] == source.name and doc["input"]["shape_zyx"] == list(study.ct.shape)
    assert doc["input"]["header_repairs"] == study.repairs
    assert doc["model"].get("weights_sha256") and {"liver", "tumors"} <= doc["findings"].keys()
    return doc


@pytest.fixture(scope="module")
def dicom_run(server: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`medseg segment` on the real anonymized DICOM series, once: its output folder and the finished command."""
    out = tmp_path_factory.mktemp("realct-dicom") / "result"
    return out, _segment(server, realct.path(realct.DICOM_SERIES), out)


def test_segment_on_the_real_anonymized_dicom_series_writes_labels_findings_a_seg_and_a_preview(
        dicom_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    source = realct.path(realct.DICOM_SERIES)
    out, r = dicom_run
    study = read_study(source)  # this process derives the same UIDs as the command did
    assert len(study.repairs) == 4
    for repair in study.repairs:
        assert f"note: header repaired: {repair}" in r.stdout
    doc = _check_common(out, source, study)
    assert doc["input"]["format"] == "dicom" and doc["input"]["series_instance_uid"] == study.series_uid
    # the labels lie on the series' canonical grid, where TotalSegmentator's labels of it lie too
    truth_grid = read_study(realct.path(realct.DICOM_LABELS))
    assert np.abs(read_study(out / "labels.nii.gz").affine_lps - truth_grid.affine_lps).max() < 1e-3
    seg = pydicom.dcmread(out / "seg.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study.dicom_headers[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == study.dicom_headers[0].FrameOfReferenceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == study.series_uid
    assert len(ref.ReferencedInstanceSequence) == realct.DICOM_SLICES
    assert sorted(p.name for p in out.iterdir()) == ["findings.json", "labels.nii.gz", "preview.png", "seg.dcm"]


@needs_dciodvfy
def test_the_seg_of_the_real_series_passes_dciodvfy(dicom_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    assert dciodvfy_errors(dicom_run[0] / "seg.dcm") == []


def test_segment_on_the_real_ct_nifti_keeps_its_grid_and_writes_findings_and_a_preview(server: Any, tmp_path: Path) -> None:
    source = realct.path(realct.CT)
    out = tmp_path / "result"
    _segment(server, source, out)
    study = read_study(source)
    doc = _check_common(out, source, study)
    assert doc["input"]["format"] == "nifti" and doc["input"]["header_repairs"] == []
    original: Any = nib.load(str(source))
    labels: Any = nib.load(str(out / "labels.nii.gz"))
    assert labels.shape == original.shape
    np.testing.assert_allclose(labels.affine, original.affine, atol=1e-3)
    assert sorted(p.name for p in out.iterdir()) == ["findings.json", "labels.nii.gz", "preview.png"]
