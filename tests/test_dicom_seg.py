"""DICOM SEG out: references the source series, codes its segments, passes dciodvfy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.synth.phantom import Phantom
from medseg_client.io.seg import write_seg
from medseg_client.io.studies import read_study, write_phantom
from medseg_client.spec import SPEC
from tests.helpers import PROVENANCE, dciodvfy_errors, needs_dciodvfy


@pytest.fixture(scope="module")
def series(small_phantom: Phantom, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("series")
    write_phantom(small_phantom, out, "dicom")
    return out / "dicom"


def test_seg_references_the_source_series_and_codes_each_label(series: Path, small_phantom: Phantom, tmp_path: Path) -> None:
    study = read_study(series)
    write_seg(tmp_path / "seg.dcm", study.dicom_files, study.to_native(small_phantom.labels), PROVENANCE)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    src = pydicom.dcmread(study.dicom_files[0])
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == [lab.display for lab in SPEC.labels[1:]]
    for s, lab in zip(segments, SPEC.labels[1:], strict=True):
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == lab.type.value  # type: ignore[union-attr]
        algo = s.SegmentationAlgorithmIdentificationSequence[0]
        params = str(algo.AlgorithmParameters)
        assert PROVENANCE["weights_sha256"] in params and PROVENANCE["onnx_sha256"] in params


def test_seg_frames_hold_the_labels_slice_by_slice(series: Path, small_phantom: Phantom, tmp_path: Path) -> None:
    import highdicom as hd

    study = read_study(series)
    write_seg(tmp_path / "seg.dcm", study.dicom_files, study.to_native(small_phantom.labels), PROVENANCE)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in study.dicom_files]
    liver = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], combine_segments=False)[..., 0]
    assert np.array_equal(liver.astype(bool), small_phantom.labels == SPEC.label("liver").value)


def test_seg_segments_follow_the_classes_whatever_their_label_values(series: Path, small_phantom: Phantom,
                                                                     tmp_path: Path) -> None:
    """An imported model's classes need not be 1..K: segment n holds the voxels of the n-th class's value."""
    import dataclasses

    import highdicom as hd

    study = read_study(series)
    liver, tumor = SPEC.label("liver"), SPEC.label("liver_tumor")
    labels = np.where(small_phantom.labels == liver.value, 7, np.where(small_phantom.labels == tumor.value, 3, 0))
    classes = [SPEC.labels[0], dataclasses.replace(liver, value=7), dataclasses.replace(tumor, value=3)]
    write_seg(tmp_path / "seg.dcm", study.dicom_files, study.to_native(labels.astype(np.uint8)), PROVENANCE,
              classes=classes)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in study.dicom_files]
    masks = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], combine_segments=False)
    assert np.array_equal(masks[..., 0].astype(bool), labels == 7) and masks[..., 0].any()
    assert np.array_equal(masks[..., 1].astype(bool), labels == 3)


def _enhanced(series: Path, folder: Path) -> int:
    """The series as one enhanced multi-frame CT, its frames out of spatial order, in ``folder``; its frame count."""
    import highdicom as hd

    legacy = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    rng = np.random.default_rng(0)
    legacy = [legacy[i] for i in rng.permutation(len(legacy))]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, series_instance_uid=hd.UID(), series_number=2,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    folder.mkdir()
    mf.save_as(folder / "enhanced.dcm")
    return len(legacy)


@needs_dciodvfy
def test_every_seg_and_phantom_slice_we_write_passes_dciodvfy(series: Path, small_phantom: Phantom, tmp_path: Path) -> None:
    study = read_study(series)
    write_seg(tmp_path / "seg.dcm", study.dicom_files, study.to_native(small_phantom.labels), PROVENANCE)
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    assert dciodvfy_errors(study.dicom_files[0]) == []
    _enhanced(series, tmp_path / "mf")  # and the SEG of an enhanced multi-frame CT
    multiframe = read_study(tmp_path / "mf")
    write_seg(tmp_path / "mf-seg.dcm", multiframe.dicom_files, multiframe.to_native(small_phantom.labels), PROVENANCE,
              multiframe.frame_indices)
    assert dciodvfy_errors(tmp_path / "mf-seg.dcm") == []


def test_an_enhanced_multiframe_ct_reads_like_its_series_and_gets_a_seg_of_its_frames(
        series: Path, small_phantom: Phantom, tmp_path: Path) -> None:
    import highdicom as hd

    folder = tmp_path / "mf"
    frames = _enhanced(series, folder)
    study = read_study(folder)
    assert np.array_equal(study.ct, small_phantom.ct)
    np.testing.assert_allclose(study.lps_mm([0, 0, 0]), small_phantom.origin_mm, atol=0.01)  # lps_mm rounds
    write_seg(tmp_path / "seg.dcm", study.dicom_files, study.to_native(small_phantom.labels), PROVENANCE,
              study.frame_indices)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    src_uid = pydicom.dcmread(folder / "enhanced.dcm").SOPInstanceUID
    liver = seg.get_pixels_by_source_frame(src_uid, source_frame_numbers=list(range(1, frames + 1)),
                                           segment_numbers=[1], combine_segments=False)[..., 0]
    source_frames = pydicom.dcmread(folder / "enhanced.dcm")
    truth = small_phantom.labels == SPEC.label("liver").value
    for f in range(frames):  # frame f of the source lies at the slice its position says
        z = float(source_frames.PerFrameFunctionalGroupsSequence[f].PlanePositionSequence[0].ImagePositionPatient[2])
        k = round((z - small_phantom.origin_mm[2]) / small_phantom.spacing[0])
        assert np.array_equal(liver[f].astype(bool), truth[k])
