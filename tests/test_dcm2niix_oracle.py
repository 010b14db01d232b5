"""The DICOM reader agrees with dcm2niix, the reference converter: same voxels, same affine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.synth.phantom import generate
from medseg_client.io.studies import read_study, write_phantom

pytestmark = pytest.mark.skipif(shutil.which("dcm2niix") is None,
                                reason="dcm2niix not installed (Debian package dcm2niix; `make sysdeps`)")

ORIENTATIONS = {  # ImageOrientationPatient (row, column direction cosines)
    "axial": [1, 0, 0, 0, 1, 0],
    "sagittal": [0, 1, 0, 0, 0, -1],
    "coronal_flipped": [-1, 0, 0, 0, 0, -1],
}


def _dcm2niix(series: Path, out: Path) -> Path:
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "y", "-b", "n", "-f", "oracle", "-o", str(out), str(series)],
                   check=True, capture_output=True, timeout=120)
    return out / "oracle.nii.gz"


def _agree(series: Path, tmp_path: Path) -> None:
    ours = read_study(series)
    theirs = read_study(_dcm2niix(series, tmp_path / "nii"))
    assert ours.ct.shape == theirs.ct.shape
    assert np.array_equal(ours.ct, theirs.ct)
    assert np.abs(ours.affine_lps - theirs.affine_lps).max() < 1e-3


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_phantom_series_in_any_orientation_match_dcm2niix(orientation: str, tmp_path: Path) -> None:
    ph = generate(26, num_slices=80, slice_thickness=4.0)
    write_phantom(ph, tmp_path, "dicom")
    iop = ORIENTATIONS[orientation]
    normal = np.cross(iop[:3], iop[3:])
    for k, f in enumerate(sorted((tmp_path / "dicom").iterdir())):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.array([-200.0, -150.0, 100.0]) + k * 4.0 * normal]
        ds.save_as(f)
    _agree(tmp_path / "dicom", tmp_path)


def test_a_series_made_from_pydicoms_real_ct_matches_dcm2niix(tmp_path: Path) -> None:
    src = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    series = tmp_path / "ct_small"
    series.mkdir()
    base = pydicom.dcmread(src)
    iop = np.array([float(v) for v in base.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.array([float(v) for v in base.ImagePositionPatient])
    for k in range(4):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["ct_small", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp + k * 5.0 * normal]
        ds.save_as(series / f"{k}.dcm")
    _agree(series, tmp_path)
