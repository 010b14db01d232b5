"""The real CT of `make realct`: TotalSegmentator's test reference files (Apache-2.0), test data only.

`make realct` (a prerequisite of `make test`) fetches TotalSegmentator 2.18.0's source distribution from
PyPI and keeps its ``tests/reference_files/`` in ``.cache/realct/reference_files`` (``$MEDSEG_REALCT``
elsewhere). A test that needs a file asks ``path()``: where the cache is missing the test FAILS with
"run `make realct`", it never skips silently.

What the files are (checked by tests/test_realct_reader.py):

- ``example_ct_dicom/``: a 20-slice axial CT series (512 x 512, 2 mm steps, JPEG 2000 lossless),
  anonymized: SOPClassUID, SOPInstanceUID, StudyInstanceUID and SeriesInstanceUID blank (the file meta
  still has the SOP class and instance UIDs). Its labels are ``example_seg_dicom.nii.gz``
  (TotalSegmentator's label numbers, liver = 5), stored with the rows flipped relative to the DICOM
  pixel order: compare in patient space, through the affines (``dicom_truth()``).
- ``example_ct.nii.gz``: a 3 mm abdomen-pelvis CT (122 x 101 x 112). ``example_seg.nii.gz`` labels only its
  top 30 slices: they are the labels of ``example_ct_sm.nii.gz``, which is slices 82..111 of example_ct
  along the file's third axis (its header's origin is 246 mm off: ignore it). ``example_ct_truth()``
  puts them on example_ct's grid.
- ``example_mr_sm.nii.gz``: an MR volume, not CT (a NIfTI does not say so: it reads as a volume).
- ``aorta_report/example_ct.nii.gz``: a chest CT angiography reaching the upper abdomen (1.5 mm).
- ``pulmonary_report/models/ct_cropped.nii.gz``: a cropped chest CT (1.5 mm).

The session fixture ``realct`` (tests/conftest.py) is ``cases()``: the paths, and the labels on a study's
canonical grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MEDSEG_REALCT") or ROOT / ".cache" / "realct") / "reference_files"

DICOM_SERIES = "example_ct_dicom"
DICOM_LABELS = "example_seg_dicom.nii.gz"
DICOM_SLICES = 20
CT = "example_ct.nii.gz"
CT_LABELS = "example_seg.nii.gz"  # labels of example_ct's slices 82..111 (third file axis)
CT_LABELLED = slice(82, 112)
MR = "example_mr_sm.nii.gz"
CHEST_CTA = "aorta_report/example_ct.nii.gz"
CHEST_CT_CROPPED = "pulmonary_report/models/ct_cropped.nii.gz"
NIFTI_CASES = (CT, MR, CHEST_CTA, CHEST_CT_CROPPED)
LIVER = 5  # TotalSegmentator's label number of the liver


def path(name: str) -> Path:
    """A reference file or folder of the cache; the test fails (never skips) where it is missing."""
    p = CACHE / name
    if not p.exists():
        pytest.fail(f"{p} is missing: run `make realct` (TotalSegmentator's reference files, fetched from PyPI)")
    return p


def dicom_truth() -> np.ndarray:
    """The labels of the DICOM series on the canonical (z, y, x) LPS grid, as the reader puts the series."""
    from medseg_client.io.studies import read_study

    return read_study(path(DICOM_LABELS)).ct.astype(np.uint8)


def example_ct_truth() -> tuple[np.ndarray, np.ndarray]:
    """(labels, labelled) in example_ct's own (i, j, k) voxel order: the labels of its top 30 slices, zero
    elsewhere, and which k slices are labelled at all (compare only those)."""
    import nibabel as nib

    shape = nib.load(str(path(CT))).shape  # type: ignore[attr-defined]
    labels = np.asanyarray(nib.load(str(path(CT_LABELS))).dataobj).astype(np.uint8)  # type: ignore[attr-defined]
    full = np.zeros(shape, np.uint8)
    full[:, :, CT_LABELLED] = labels
    labelled = np.zeros(shape[2], bool)
    labelled[CT_LABELLED] = True
    return full, labelled


def _on_canonical_grid(study: Any, native: np.ndarray) -> np.ndarray:
    """A volume in the study's native (i, j, k) voxel order on its canonical (z, y, x) grid, as the reader
    puts the study's own voxels."""
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(native, study.ornt).transpose(2, 1, 0))


@dataclass(frozen=True)
class RealCT:
    """The reference files a test uses, and their labels on a study's canonical grid."""

    dicom_series: Path
    dicom_labels: Path
    nifti_ct: Path
    nifti_ct_labels: Path
    mr: Path
    chest_cta: Path
    chest_ct_cropped: Path
    liver_label: int = LIVER
    labelled_top_slices: int = CT_LABELLED.stop - CT_LABELLED.start

    def truth_on_canonical_grid(self, study: Any, labels: Path) -> np.ndarray:
        """``labels`` (a NIfTI of the study's voxels, in any voxel order) on ``study``'s canonical grid, through
        both affines; the test fails where the two grids differ."""
        from medseg_client.io.studies import read_study

        truth = read_study(labels)
        if truth.ct.shape != study.ct.shape or np.abs(truth.affine_lps - study.affine_lps).max() > 1e-3:
            pytest.fail(f"{labels.name} does not lie on the study's grid")
        return truth.ct.astype(np.uint8)

    def top_labels_on_canonical_grid(self, study: Any) -> np.ndarray:
        """example_ct's labels of its labelled top slices on the study's canonical grid: the last
        ``labelled_top_slices`` canonical slices (z runs feet to head); ``study`` is read_study(nifti_ct)."""
        labels, labelled = example_ct_truth()
        canonical = _on_canonical_grid(study, labels)
        top = _on_canonical_grid(study, np.broadcast_to(labelled, labels.shape).astype(np.uint8))
        if canonical.shape != study.ct.shape or not top[-self.labelled_top_slices:].all() or top[:-self.labelled_top_slices].any():
            pytest.fail("example_ct's labelled slices are not its top slices on the canonical grid")
        return canonical[-self.labelled_top_slices:]


def cases() -> RealCT:
    """The reference files (the test fails, never skips, where the cache is missing)."""
    return RealCT(path(DICOM_SERIES), path(DICOM_LABELS), path(CT), path(CT_LABELS), path(MR), path(CHEST_CTA),
                  path(CHEST_CT_CROPPED))


def dicom_series_copy(folder: Path, tag: str, source: Path | None = None) -> list[Path]:
    """The real DICOM series (JPEG 2000) under new study, series and instance UIDs (``tag`` makes them distinct), its
    SOP Class UID restored where its anonymizer blanked it (Orthanc cannot forward an instance without one): a
    study a PACS holds and sends, for the node's tests and bench."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    out = []
    study, series = generate_uid(entropy_srcs=[tag, "study"]), generate_uid(entropy_srcs=[tag, "series"])
    for i, src in enumerate(sorted((source or path(DICOM_SERIES)).iterdir())):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[tag, str(i)])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        out.append(folder / f"{i:04d}.dcm")
        ds.save_as(out[-1])
    return out
