"""Phantoms are deterministic and plausible; DICOM and NIfTI round-trip onto the canonical grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.synth.phantom import LIVER, TUMOR, Phantom, generate
from medseg_client.errors import StudyError
from medseg_client.io.studies import read_study, save_nifti, write_phantom


def test_the_same_seed_gives_the_same_study(small_phantom: Phantom) -> None:
    again = generate(17, num_slices=80, slice_thickness=4.0)
    assert np.array_equal(again.ct, small_phantom.ct) and np.array_equal(again.labels, small_phantom.labels)
    assert not np.array_equal(generate(18, num_slices=80, slice_thickness=4.0).ct, small_phantom.ct)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_phantoms_follow_the_acquisition_recipe(seed: int) -> None:
    ph = generate(seed)
    nz, rows, cols = ph.ct.shape
    assert rows == cols == 512 and 8 <= nz <= 600 and 150 <= nz * ph.spacing[0] <= 600  # mm covered
    assert 1.0 <= ph.spacing[0] <= 5.0 and 0.58 <= ph.spacing[1] == ph.spacing[2] <= 0.98
    assert ph.ct.dtype == np.int16 and -1024 <= ph.ct.min() and ph.ct.max() <= 3071
    assert 0 <= len(ph.tumors) <= 4 and all(5 <= t.diameter_mm <= 42 for t in ph.tumors)
    assert ph.region == "abdomen" and ph.phase in ("none", "arterial", "portal", "delayed")
    assert ph.liver_ml > 0.6 * ph.liver_total_ml  # an abdominal scan holds most of the liver
    liver_hu = np.median(ph.ct[ph.labels == LIVER])
    assert -20 < liver_hu < 160  # severe steatosis .. portal phase
    assert all(abs(t.delta_hu) >= 15 for t in ph.tumors)  # drawn visible; partial volume fades the small ones
    if any(t.diameter_mm >= 20 for t in ph.tumors):
        assert abs(np.median(ph.ct[ph.labels == TUMOR]) - liver_hu) > 8


@pytest.mark.parametrize("region", ["head", "neck", "chest", "pelvis", "legs", "no_liver"])
def test_scans_of_other_regions_hold_no_liver(region: str) -> None:
    ph = generate(31, region=region, num_slices=30, slice_thickness=5.0)
    assert ph.region == region and not ph.labels.any() and ph.liver_ml == 0.0 and ph.tumors == []
    assert (ph.ct > -500).mean() > 0.03  # there is a body in it


def test_a_liver_tip_scan_holds_only_a_sliver_of_liver() -> None:
    ph = generate(32, region="liver_tip")
    assert 0 < ph.liver_ml < 0.2 * ph.liver_total_ml


def test_changing_one_organ_changes_no_other_part_of_the_phantom() -> None:
    """Each part draws from its own random stream: the body and the liver of a seed do not depend on the scan."""
    abdomen = generate(33, num_slices=40, slice_thickness=5.0)
    other = generate(33, num_slices=40, slice_thickness=5.0, phase="none" if abdomen.phase != "none" else "portal")
    assert abdomen.phase != other.phase
    assert np.array_equal(abdomen.labels, other.labels)  # the anatomy is the same; only enhancement differs
    assert abdomen.tumors == other.tumors


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_written_studies_read_back_voxel_for_voxel(fmt: str, small_phantom: Phantom, tmp_path: Path) -> None:
    write_phantom(small_phantom, tmp_path, fmt)
    study = read_study(tmp_path / ("dicom" if fmt == "dicom" else "ct.nii.gz"))
    assert np.array_equal(study.ct, small_phantom.ct)
    np.testing.assert_allclose(study.spacing, small_phantom.spacing, rtol=1e-5)
    np.testing.assert_allclose(study.lps_mm([0, 0, 0]), small_phantom.origin_mm, atol=0.01)
    truth = nib.load(str(tmp_path / "labels_truth.nii.gz"))
    np.testing.assert_allclose(truth.affine, study.native_affine_ras, atol=1e-3)
    if fmt == "dicom":  # the reader builds the study whole: its series, slices and headers in one record
        assert study.series_uid and len(study.dicom_files) == len(study.frame_indices) == len(study.dicom_headers) \
            == small_phantom.ct.shape[0] and "slices" in study.note
    with pytest.raises(dataclasses.FrozenInstanceError):  # and it never changes afterwards
        study.note = "patched"  # type: ignore[misc]


def test_dicom_slices_are_ordered_by_position_not_by_file_name(small_phantom: Phantom, tmp_path: Path) -> None:
    write_phantom(small_phantom, tmp_path, "dicom")
    files = sorted((tmp_path / "dicom").iterdir())
    rng = np.random.default_rng(0)
    for f, new in zip(files, rng.permutation(len(files)), strict=True):
        f.rename(f.with_name(f"x{new:04d}.dcm"))
    assert np.array_equal(read_study(tmp_path / "dicom").ct, small_phantom.ct)


def test_a_reoriented_nifti_maps_to_the_same_canonical_volume_and_back(small_phantom: Phantom, tmp_path: Path) -> None:
    write_phantom(small_phantom, tmp_path, "nifti")
    img = nib.load(str(tmp_path / "ct.nii.gz"))
    # flip i and swap i/j: a differently stored file of the same anatomy
    data = np.asanyarray(img.dataobj)[::-1].transpose(1, 0, 2)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[1] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    affine = img.affine @ flip @ swap
    save_nifti(np.ascontiguousarray(data), affine, tmp_path / "odd.nii.gz")
    study = read_study(tmp_path / "odd.nii.gz")
    assert np.array_equal(study.ct, small_phantom.ct)
    assert np.array_equal(study.to_native(study.ct), data)


@pytest.mark.parametrize("kind", ["nifti1", "nifti2", "nifti1-bigendian"])
def test_gzipped_nifti_is_read_as_nibabel_reads_it(kind: str, small_phantom: Phantom, tmp_path: Path) -> None:
    """The one-call inflate (ISA-L) reads NIfTI-1 and -2, either byte order, scaled data, as nibabel's own loader."""
    write_phantom(small_phantom, tmp_path, "nifti")
    img = nib.load(str(tmp_path / "ct.nii.gz"))
    data = np.asarray(img.dataobj).astype(np.float32) / 2  # scl_slope 2 below
    klass = nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image
    out = klass(data.astype(">f4" if kind.endswith("bigendian") else "<f4"), img.affine)
    out.header.set_slope_inter(2.0, 0.0)
    out.to_filename(str(tmp_path / f"{kind}.nii.gz"))
    study = read_study(tmp_path / f"{kind}.nii.gz")
    assert np.array_equal(study.ct, small_phantom.ct)
    assert np.allclose(study.native_affine_ras, img.affine)


def test_labels_are_written_in_nifti_order_and_read_back_by_nibabel(small_phantom: Phantom, tmp_path: Path) -> None:
    """to_native gives the file's (i, j, k) order laid out as NIfTI stores it; save_nifti writes C- or F-ordered
    volumes alike, with both the qform and the sform."""
    write_phantom(small_phantom, tmp_path, "nifti")
    study = read_study(tmp_path / "ct.nii.gz")
    native = study.to_native(small_phantom.labels)
    assert native.flags.f_contiguous
    save_nifti(native, study.native_affine_ras, tmp_path / "f.nii.gz")
    save_nifti(np.ascontiguousarray(native), study.native_affine_ras, tmp_path / "c.nii.gz")
    for name in ("f.nii.gz", "c.nii.gz"):
        img = nib.load(str(tmp_path / name))
        assert np.array_equal(np.asarray(img.dataobj), native)
        assert np.allclose(img.affine, study.native_affine_ras)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert np.array_equal(read_study(tmp_path / "f.nii.gz").ct, small_phantom.labels.astype(np.int16))


def test_unreadable_inputs_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyError, match="no files"):
        read_study(tmp_path / "empty")
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "a.txt").write_text("hello")
    with pytest.raises(StudyError, match="no CT image slices"):
        read_study(tmp_path / "notdicom")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(StudyError, match=r"broken\.nii\.gz"):
        read_study(tmp_path / "broken.nii.gz")
    import gzip

    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(b"\x5c\x01\x00\x00" + bytes(200)))  # a header cut short
    with pytest.raises(StudyError, match=r"cut\.nii\.gz: not a readable NIfTI file"):
        read_study(tmp_path / "cut.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(StudyError, match=r"empty\.nii\.gz: not a readable NIfTI file"):
        read_study(tmp_path / "empty.nii.gz")
    with pytest.raises(StudyError, match="expected a DICOM series folder"):
        read_study(tmp_path / "notdicom" / "a.txt")


def test_a_folder_with_two_series_and_a_localizer_reads_the_largest_or_the_one_asked(tmp_path: Path) -> None:
    import pydicom

    big = generate(21, num_slices=90, slice_thickness=4.0)
    small = generate(22, num_slices=80, slice_thickness=4.0)
    write_phantom(big, tmp_path / "a", "dicom")
    write_phantom(small, tmp_path / "b", "dicom")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, f in enumerate(sorted((tmp_path / "a" / "dicom").iterdir()) + sorted((tmp_path / "b" / "dicom").iterdir())):
        f.rename(mixed / f"{i:05d}")
    # a localizer in the larger series must not count as a slice
    scout = pydicom.dcmread(mixed / "00000")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImagePositionPatient = [0, 0, 9999]
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(mixed / "scout")
    study = read_study(mixed)
    assert np.array_equal(study.ct, big.ct) and "largest of 2" in study.note
    small_uid = pydicom.dcmread(mixed / "00090").SeriesInstanceUID
    assert np.array_equal(read_study(mixed, small_uid).ct, small.ct)
    with pytest.raises(StudyError, match=r"no CT series 1\.2\.3"):
        read_study(mixed, "1.2.3")


def _compress_series(folder: Path, syntax: str) -> None:
    import shutil
    import subprocess

    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGLosslessSV1

    for f in sorted(folder.iterdir()):
        if syntax == JPEGLosslessSV1:
            if shutil.which("dcmcjpeg") is None:
                pytest.skip("dcmcjpeg (Debian dcmtk) is needed to write JPEG lossless; `make sysdeps`")
            subprocess.run(["dcmcjpeg", "+e1", str(f), str(f)], check=True, capture_output=True, timeout=60)
            continue
        ds = pydicom.dcmread(f)
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(f, enforce_file_format=True)
        else:
            ds.compress(syntax)
            ds.save_as(f)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                                    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1.99"],
                         ids=["RLE", "JPEG-LS", "JPEG2000", "JPEG-lossless", "deflate"])
def test_compressed_series_decode_to_the_same_volume(syntax: str, tmp_path: Path) -> None:
    import pydicom

    ph = generate(23, num_slices=80, slice_thickness=4.0)
    write_phantom(ph, tmp_path, "dicom")
    _compress_series(tmp_path / "dicom", syntax)
    first = pydicom.dcmread(next((tmp_path / "dicom").iterdir()), stop_before_pixels=True)
    assert first.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(read_study(tmp_path / "dicom").ct, ph.ct)


@pytest.mark.parametrize("damage", ["truncate_pixels", "bad_position", "huge_rows", "bad_slope", "garbage_file"])
def test_a_damaged_slice_is_refused_by_file_name(damage: str, tmp_path: Path) -> None:
    import pydicom

    ph = generate(24, num_slices=80, slice_thickness=4.0)
    write_phantom(ph, tmp_path, "dicom")
    victim = sorted((tmp_path / "dicom").iterdir())[40]
    ds = pydicom.dcmread(victim)
    if damage == "truncate_pixels":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    elif damage == "bad_position":
        ds.ImagePositionPatient = ["nan", "0", "0"]
    elif damage == "huge_rows":
        ds.Rows = 60000
    elif damage == "bad_slope":
        ds.RescaleSlope = "0"
    if damage == "garbage_file":
        victim.write_bytes(victim.read_bytes()[:2000])
        match = "CT0041|slice|pixel|readable"
    else:
        ds.save_as(victim)
        match = victim.name
    with pytest.raises(StudyError, match=match):
        read_study(tmp_path / "dicom")


@pytest.mark.parametrize(
    ("defect", "message"),
    [("missing", "1 slice\\(s\\) missing between"), ("duplicate", "share the position"),
     ("uneven", "slice spacing is uneven"), ("not_parallel", "not parallel"), ("tilt_40", "exceeds the 30"),
     ("inplane_jump", "shifted in-plane off"), ("zero_spacing", "PixelSpacing"), ("nan_spacing", "PixelSpacing"),
     ("mixed_size", "slice is 256x512, the series 512x512"), ("jitter", None)],
)
def test_series_geometry_rules(defect: str, message: str | None, tmp_path: Path) -> None:
    import pydicom

    ph = generate(25, num_slices=80, slice_thickness=4.0)
    write_phantom(ph, tmp_path, "dicom")
    files = sorted((tmp_path / "dicom").iterdir())
    rng = np.random.default_rng(0)
    if defect == "missing":
        files[40].unlink()
    for k, f in enumerate(files):
        if defect == "missing" and k == 40:
            continue
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        if defect == "duplicate" and k == 41:
            z -= 4.0
        elif defect == "uneven" and k >= 41:
            z += 1.3
        elif defect == "not_parallel" and k == 10:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.996, 0.0872]
        elif defect == "tilt_40":
            y += k * 4.0 * np.tan(np.radians(40))
        elif defect == "inplane_jump" and k == 30:
            x += 2.0
        elif defect == "zero_spacing":
            ds.PixelSpacing = ["0", "0.8"]
        elif defect == "nan_spacing":
            ds.PixelSpacing = ["nan", "0.8"]
        elif defect == "mixed_size" and k == 20:
            ds.Rows = 256
            ds.PixelData = ds.PixelData[: 256 * 512 * 2]
        elif defect == "jitter":
            z += float(rng.uniform(-0.02, 0.02))
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y:.4f}", f"{z:.4f}"]
        ds.save_as(f)
    if message is None:
        assert np.array_equal(read_study(tmp_path / "dicom").ct, ph.ct)  # jitter within tolerance is read
    else:
        with pytest.raises(StudyError, match=message):
            read_study(tmp_path / "dicom")


def test_a_tilted_series_is_corrected_onto_the_orthogonal_grid_and_labels_go_back(tmp_path: Path) -> None:
    from tests.series_variants import tilt_rows, write_variant

    ph = generate(28, num_slices=80, slice_thickness=4.0)
    write_variant(ph, tmp_path / "tilted", "tilted")
    study = read_study(tmp_path / "tilted")
    expected = np.degrees(np.arctan(ph.spacing[1] / ph.spacing[0]))
    assert f"gantry tilt of {expected:.1f} degrees corrected" in study.note
    first = ph.ct.shape[0]  # slice k of the tilted series starts k rows further: rows < k were never acquired
    assert np.array_equal(study.ct[:, first:], ph.ct[:, first:])
    native = study.to_native(ph.labels)  # labels from the orthogonal grid back onto the tilted slices
    assert np.array_equal(native.transpose(2, 1, 0), tilt_rows(ph.labels, 0))
    shear = study.native_affine_ras[:3, 2]
    assert abs(shear[1]) > 0.5  # the output affine keeps the tilt (a step in y per slice)


def test_the_phantom_records_its_other_organs_on_their_sides() -> None:
    """Phantom.organs: spleen and kidneys where they were drawn, never on the liver, each kidney on its own side of
    the spine (LPS: x < 0, a lower column index, is the patient's right), with adult volumes."""
    from medseg.synth.phantom import ORGANS

    ph = generate(6000, num_slices=60, slice_thickness=4.0)
    assert ph.organs is not None and ph.organs.shape == ph.labels.shape
    assert not (ph.organs.astype(bool) & (ph.labels > 0)).any()
    ml = {name: float((ph.organs == v).sum()) * float(np.prod(ph.spacing)) / 1000 for name, v in ORGANS.items()}
    assert all(20 < v < 600 for v in ml.values()), ml
    centre = ph.ct.shape[2] / 2
    columns = {name: np.nonzero(ph.organs == v)[2].mean() for name, v in ORGANS.items()}
    assert columns["kidney_right"] < centre < columns["kidney_left"] and columns["spleen"] > centre
