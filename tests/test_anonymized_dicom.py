"""Anonymized DICOM: what an anonymizer blanks is repaired from what the files still say, or refused in one
line naming the file and the attribute; the real series of `make realct` reads, lies where its labels say
and gets a SEG that passes dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from medseg.synth.phantom import Phantom
from medseg_client.errors import StudyError
from medseg_client.io.seg import write_seg
from medseg_client.io.studies import CT_IMAGE_STORAGE, read_study, write_dicom_series
from medseg_client.spec import SPEC
from tests import realct
from tests.helpers import PROVENANCE, dciodvfy_errors, needs_dciodvfy

SOFT_TISSUE_HU = (0, 250)


def _series(folder: Path, slices: int = 4) -> list[Path]:
    ct = np.random.default_rng(0).integers(-1000, 1000, size=(slices, 32, 32)).astype(np.int16)
    ph = Phantom(seed=0, ct=ct, labels=np.zeros_like(ct, np.uint8), spacing=(2.0, 0.8, 0.8), origin_mm=(0.0, 0.0, 0.0))
    return write_dicom_series(ph, folder)


def _edit(files: list[Path], change: Callable[[Any], object]) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        change(ds)
        ds.save_as(f, enforce_file_format=False)


def _set_instance_uid(ds: Any, uid: str) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def _anonymize(ds: Any) -> None:
    """What TotalSegmentator's example series shows: the four UIDs blank, the file meta kept."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, "")


def _liver_in_soft_tissue(ct: np.ndarray, liver: np.ndarray) -> float:
    """The fraction of liver voxels between 0 and 250 HU: near 1 when a label lies on its organ."""
    hu = ct[liver]
    return float(((hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])).mean())


# --- the repair rules, on a tiny phantom series ---

def test_blank_uids_are_taken_from_the_file_meta_or_derived_and_listed(tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    meta = {f.name: pydicom.dcmread(f).file_meta.MediaStorageSOPInstanceUID for f in files}
    frame = pydicom.dcmread(files[0]).FrameOfReferenceUID
    _edit(files, _anonymize)
    study = read_study(tmp_path / "s")
    assert study.repairs == ["SOPClassUID taken from the file meta (4 files)",
                             "SOPInstanceUID taken from the file meta (4 files)",
                             "StudyInstanceUID blank, derived from the frame of reference UID (4 files)",
                             "SeriesInstanceUID blank, derived from the series' SOP instance UIDs (4 files)"]
    assert UID(study.series_uid).is_valid
    for path, ds in zip(study.dicom_files, study.dicom_headers, strict=True):
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.SOPInstanceUID == meta[path.name]
        assert ds.SeriesInstanceUID == study.series_uid and UID(ds.StudyInstanceUID).is_valid
        assert ds.FrameOfReferenceUID == frame


def test_the_same_files_get_the_same_uids_wherever_they_lie_and_however_named(tmp_path: Path) -> None:
    files = _series(tmp_path / "a")
    _edit(files, _anonymize)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for k, f in enumerate(sorted((tmp_path / "b").iterdir())):
        f.rename(f.with_name(f"renamed{9 - k}"))
    first, again, moved = read_study(tmp_path / "a"), read_study(tmp_path / "a"), read_study(tmp_path / "b")
    for study in (again, moved):
        assert study.series_uid == first.series_uid
        assert study.dicom_headers[0].StudyInstanceUID == first.dicom_headers[0].StudyInstanceUID


def test_files_that_all_lack_a_series_uid_form_one_series_apart_from_a_named_one(tmp_path: Path) -> None:
    blank = _series(tmp_path / "s", slices=5)
    _edit(blank, lambda ds: setattr(ds, "SeriesInstanceUID", ""))
    named = _series(tmp_path / "other", slices=3)
    _edit(named, lambda ds: _set_instance_uid(ds, ds.SOPInstanceUID + ".9"))
    for f in named:
        f.rename(tmp_path / "s" / f"other_{f.name}")
    study = read_study(tmp_path / "s")
    assert study.ct.shape[0] == 5 and "largest of 2 CT series" in study.note
    assert study.repairs == ["SeriesInstanceUID blank, derived from the series' SOP instance UIDs (5 files)"]
    assert read_study(tmp_path / "s", study.series_uid).series_uid == study.series_uid  # --series takes it


def test_a_blank_uid_some_files_still_carry_is_taken_from_them(tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    frame = pydicom.dcmread(files[0]).FrameOfReferenceUID
    _edit(files[:2], lambda ds: setattr(ds, "FrameOfReferenceUID", ""))
    study = read_study(tmp_path / "s")
    assert study.repairs == ["FrameOfReferenceUID blank, taken from the series' other files (2 files)"]
    assert {ds.FrameOfReferenceUID for ds in study.dicom_headers} == {frame}


def test_a_frame_of_reference_blank_everywhere_is_derived(tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    _edit(files, lambda ds: setattr(ds, "FrameOfReferenceUID", ""))
    study = read_study(tmp_path / "s")
    assert study.repairs == ["FrameOfReferenceUID blank, derived from the series' SOP instance UIDs (4 files)"]
    assert len({ds.FrameOfReferenceUID for ds in study.dicom_headers}) == 1
    assert UID(study.dicom_headers[0].FrameOfReferenceUID).is_valid


@pytest.mark.parametrize("keyword", ["SOPClassUID", "SOPInstanceUID"])
def test_a_blank_sop_uid_without_a_file_meta_to_take_it_from_is_refused_naming_file_and_attribute(
        keyword: str, tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    meta_keyword = {"SOPClassUID": "MediaStorageSOPClassUID", "SOPInstanceUID": "MediaStorageSOPInstanceUID"}[keyword]

    def blank(ds: Any) -> None:
        setattr(ds, keyword, "")
        delattr(ds.file_meta, meta_keyword)

    _edit(files[2:3], blank)
    with pytest.raises(StudyError, match=rf"^{files[2].name}: {keyword} is blank and the file meta has no {meta_keyword}"):
        read_study(tmp_path / "s")


def test_a_damaged_sop_class_is_taken_from_the_file_meta_or_refused(tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    _edit(files[1:2], lambda ds: setattr(ds, "SOPClassUID", "1.2.840.1g008.5.1.4.1.1.2"))  # a flipped byte
    study = read_study(tmp_path / "s")
    assert study.repairs == ["SOPClassUID damaged, taken from the file meta (1 file)"]
    assert {ds.SOPClassUID for ds in study.dicom_headers} == {CT_IMAGE_STORAGE}
    _edit(files[1:2], lambda ds: setattr(ds.file_meta, "MediaStorageSOPClassUID", "1.2.3.4"))  # no SOP class
    with pytest.raises(StudyError, match=rf"^{files[1].name}: SOPClassUID is not a known SOP class, nor is the file "
                                         "meta's MediaStorageSOPClassUID$"):
        read_study(tmp_path / "s")


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "FrameOfReferenceUID"])
def test_a_file_whose_study_or_frame_differs_from_its_series_is_refused_naming_it(keyword: str, tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    _edit(files[2:3], lambda ds: setattr(ds, keyword, "1.2.3.4.5"))
    with pytest.raises(StudyError, match=rf"^{files[2].name}: {keyword} differs from the one the series' other files carry$"):
        read_study(tmp_path / "s")


def test_two_files_claiming_one_instance_are_refused_naming_both(tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    uid = pydicom.dcmread(files[0]).SOPInstanceUID
    _edit(files[1:2], lambda ds: _set_instance_uid(ds, uid))
    with pytest.raises(StudyError, match=rf"{files[1].name}: SOPInstanceUID is the same as {files[0].name}'s"):
        read_study(tmp_path / "s")


def test_a_blank_modality_of_a_ct_sop_class_is_ct(tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    _edit(files, lambda ds: setattr(ds, "Modality", ""))
    study = read_study(tmp_path / "s")
    assert study.repairs == ["Modality set to CT from the SOP class (4 files)"]
    assert {ds.Modality for ds in study.dicom_headers} == {"CT"}


@pytest.mark.parametrize("image_type", ["", None, "DERIVED"])
def test_a_blank_missing_or_single_valued_image_type_is_not_a_localizer(image_type: str | None, tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    _edit(files, lambda ds: delattr(ds, "ImageType") if image_type is None else setattr(ds, "ImageType", image_type))
    assert read_study(tmp_path / "s").ct.shape[0] == 4


def test_a_single_valued_localizer_image_type_is_still_a_localizer(tmp_path: Path) -> None:
    files = _series(tmp_path / "s", slices=5)
    _edit(files[:1], lambda ds: setattr(ds, "ImageType", "LOCALIZER"))
    assert read_study(tmp_path / "s").ct.shape[0] == 4


@needs_dciodvfy
def test_patient_attributes_dropped_altogether_are_added_empty_and_the_seg_is_valid(tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    dropped = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID")
    _edit(files, lambda ds: [delattr(ds, k) for k in dropped])  # type: ignore[func-returns-value]
    _edit(files, _anonymize)
    study = read_study(tmp_path / "s")
    assert [f"{k} missing, added empty (4 files)" for k in dropped] == [r for r in study.repairs if "missing" in r]
    write_seg(tmp_path / "seg.dcm", study.dicom_headers, np.zeros(study.ct.shape[::-1], np.uint8), PROVENANCE)
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []


def test_a_seg_built_from_the_files_repairs_them_as_the_reader_did(tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    _edit(files, _anonymize)
    study = read_study(tmp_path / "s")
    labels = np.zeros(study.ct.shape[::-1], np.uint8)
    write_seg(tmp_path / "from_headers.dcm", study.dicom_headers, labels, PROVENANCE)
    write_seg(tmp_path / "from_files.dcm", study.dicom_files, labels, PROVENANCE)
    a, b = (pydicom.dcmread(tmp_path / n) for n in ("from_headers.dcm", "from_files.dcm"))
    assert a.StudyInstanceUID == b.StudyInstanceUID == study.dicom_headers[0].StudyInstanceUID
    assert a.ReferencedSeriesSequence[0].SeriesInstanceUID == b.ReferencedSeriesSequence[0].SeriesInstanceUID \
        == study.series_uid


# --- the real series of `make realct` ---

@pytest.fixture(scope="module")
def real() -> Any:
    return read_study(realct.path(realct.DICOM_SERIES))


def test_the_real_anonymized_series_reads_and_lists_its_repairs(real: Any) -> None:
    assert real.ct.shape == (realct.DICOM_SLICES, 512, 512)
    np.testing.assert_allclose(real.spacing, (2.0, 0.9765625, 0.9765625))
    n = realct.DICOM_SLICES
    assert real.repairs == [f"SOPClassUID taken from the file meta ({n} files)",
                            f"SOPInstanceUID taken from the file meta ({n} files)",
                            f"StudyInstanceUID blank, derived from the frame of reference UID ({n} files)",
                            f"SeriesInstanceUID blank, derived from the series' SOP instance UIDs ({n} files)"]
    assert UID(real.series_uid).is_valid and real.series_uid in real.note
    assert all(ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID for ds in real.dicom_headers)


def test_the_real_series_lies_where_its_labels_say_in_patient_space(real: Any) -> None:
    labels = read_study(realct.path(realct.DICOM_LABELS))  # through its own affine
    assert labels.ct.shape == real.ct.shape
    assert np.abs(labels.affine_lps - real.affine_lps).max() < 1e-3
    liver = labels.ct == realct.LIVER
    assert liver.sum() > 100_000
    assert _liver_in_soft_tissue(real.ct, liver) >= 0.97
    # the test can tell: the labels' rows are stored flipped; read without the affine they miss the organ
    assert _liver_in_soft_tissue(real.ct, liver[:, ::-1]) < 0.9


def test_example_ct_is_what_its_top_slab_of_labels_says() -> None:
    import nibabel as nib

    ct = np.asanyarray(nib.load(str(realct.path(realct.CT))).dataobj)  # type: ignore[attr-defined]
    small = np.asanyarray(nib.load(str(realct.path("example_ct_sm.nii.gz"))).dataobj)  # type: ignore[attr-defined]
    assert np.array_equal(ct[:, :, realct.CT_LABELLED], small)
    labels, labelled = realct.example_ct_truth()
    assert labelled.sum() == 30 and labels[:, :, ~labelled].max() == 0
    liver = labels == realct.LIVER
    assert _liver_in_soft_tissue(ct, liver) >= 0.97
    shifted = np.zeros_like(liver)
    shifted[:, :, :30] = liver[:, :, realct.CT_LABELLED]  # the labels on the file's first 30 slices: wrong
    assert _liver_in_soft_tissue(ct, shifted) < 0.9


@needs_dciodvfy
def test_the_seg_of_the_real_series_references_its_repaired_uids_and_passes_dciodvfy(real: Any, tmp_path: Path) -> None:
    labels = read_study(realct.path(realct.DICOM_LABELS)).ct
    native = real.to_native(np.where(labels == realct.LIVER, SPEC.label("liver").value, 0).astype(np.uint8))
    write_seg(tmp_path / "seg.dcm", real.dicom_headers, native, PROVENANCE)
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.StudyInstanceUID == real.dicom_headers[0].StudyInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == real.series_uid
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} == {
        pydicom.dcmread(p, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for p in real.dicom_files}
    assert {i.ReferencedSOPClassUID for i in ref.ReferencedInstanceSequence} == {CT_IMAGE_STORAGE}


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed (Debian package dcm2niix; `make sysdeps`)")
def test_the_real_series_matches_dcm2niix(real: Any, tmp_path: Path) -> None:
    subprocess.run(["dcm2niix", "-z", "y", "-b", "n", "-f", "oracle", "-o", str(tmp_path),
                    str(realct.path(realct.DICOM_SERIES))], check=True, capture_output=True, timeout=120)
    theirs = read_study(tmp_path / "oracle.nii.gz")
    assert theirs.ct.shape == real.ct.shape
    assert np.array_equal(theirs.ct, real.ct)
    assert np.abs(theirs.affine_lps - real.affine_lps).max() < 1e-3


def test_the_realct_fixture_puts_each_example_label_on_its_studys_canonical_grid(realct: Any) -> None:
    dicom = read_study(realct.dicom_series)
    liver = realct.truth_on_canonical_grid(dicom, realct.dicom_labels) == realct.liver_label
    assert _liver_in_soft_tissue(dicom.ct, liver) >= 0.97
    ct = read_study(realct.nifti_ct)
    top = realct.labelled_top_slices
    liver = realct.top_labels_on_canonical_grid(ct) == realct.liver_label
    assert liver.shape == ct.ct[-top:].shape and _liver_in_soft_tissue(ct.ct[-top:], liver) >= 0.97
    assert _liver_in_soft_tissue(ct.ct[:top], liver) < 0.9  # the bottom slices: the labels would miss
