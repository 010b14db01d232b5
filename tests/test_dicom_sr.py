"""The DICOM objects sent back beside the SEG: the SR measurement report (TID 1500) and the preview as a Secondary
Capture; all pass dciodvfy, carry the findings' numbers, and get the same UIDs from the same inputs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from medseg.synth.phantom import Phantom, generate
from medseg_client.io.preview import write_preview
from medseg_client.io.sc import build_preview_sc
from medseg_client.io.seg import build_seg
from medseg_client.io.sr import build_sr, write_sr
from medseg_client.io.studies import Study, read_study, write_dicom_series
from medseg_client.io.uids import derived_uid
from medseg_client.spec import SPEC
from tests.helpers import PROVENANCE, dciodvfy_errors, needs_dciodvfy

COMMENT = ("121106", "DCM")
CENTER_OF_MASS = ("128138", "DCM")


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return generate(17, num_slices=24, slice_thickness=4.0)


@pytest.fixture(scope="module")
def study(phantom: Phantom, tmp_path_factory: pytest.TempPathFactory) -> Study:
    folder = tmp_path_factory.mktemp("sr") / "dicom"
    write_dicom_series(phantom, folder)
    return read_study(folder)


def _uids(study: Study, what: str, model: str = PROVENANCE["ensemble"], version: str = "1") -> tuple[str, str]:
    """A job's (series, instance) UIDs of one output, derived as a node derives them."""
    src = pydicom.dcmread(study.dicom_files[0], stop_before_pixels=True)
    series = derived_uid(src.StudyInstanceUID, src.SeriesInstanceUID, model, version, f"{what}-series")
    return series, derived_uid(series, f"{what}-instance")


def _seg(study: Study, phantom: Phantom, model: str = PROVENANCE["ensemble"]) -> Any:
    series, instance = _uids(study, "seg", model)
    return build_seg(study.dicom_files, study.to_native(phantom.labels), PROVENANCE, series_instance_uid=series,
                     sop_instance_uid=instance)


@pytest.fixture(scope="module")
def seg(study: Study, phantom: Phantom) -> Any:
    return _seg(study, phantom)


def _findings(tumors: int = 2, reported: bool = True) -> dict[str, Any]:
    """A findings.json document as `medseg segment` writes it (demo_out/result/findings.json), ``tumors`` listed."""
    listed = [{"id": n, "volume_ml": round(1.521 * n, 3), "longest_axial_diameter_mm": 18.5 + n,
               "centroid_voxel_zyx": [10.5, 176.49 + n, 175.92], "bbox_voxel_zyx": {"start": [8, 166, 168],
                                                                                   "stop": [13, 187, 187]},
               "mean_hu": 71.8, "confidence": 0.875, "centroid_lps_mm": [-64.61 + n, -57.45, -267.57]}
              for n in range(1, tumors + 1)]
    status = ({"code": "ok", "reported": True, "reason": "liver in view", "region": "abdomen"} if reported else
              {"code": "liver_not_in_view", "reported": False, "reason": "no liver in view: a chest scan",
               "region": "chest"})
    return {"model": dict(PROVENANCE), "input": {"name": "dicom", "format": "dicom"},
            "findings": {"status": status, "liver": {"found": reported, "volume_ml": 2550.32 if reported else 0.0},
                         "tumors": listed if reported else [], "tumor_burden_ml": sum(t["volume_ml"] for t in listed)},
            "timings_s": {}}


def _sr(seg: Any, study: Study, findings: dict[str, Any]) -> Any:
    series, instance = _uids(study, "sr")
    return build_sr(seg, study.dicom_files, findings, PROVENANCE, series_instance_uid=series, sop_instance_uid=instance)


def _text(group: Any, concept: tuple[str, str]) -> list[str]:
    """The TEXT values a measurement group holds under the concept (code value, scheme)."""
    return [str(item.TextValue) for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and (item.ConceptNameCodeSequence[0].CodeValue,
                                             item.ConceptNameCodeSequence[0].CodingSchemeDesignator) == concept]


def _reread(ds: Any, path: Path) -> Any:
    import highdicom as hd

    ds.save_as(path)
    return hd.sr.srread(path)


def test_derived_uids_are_valid_and_follow_their_parts() -> None:
    uid = derived_uid("1.2.3", "4.5.6", "ct_liver", "1", "seg-series")
    assert uid == derived_uid("1.2.3", "4.5.6", "ct_liver", "1", "seg-series")
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    assert uid != derived_uid("1.2.3", "4.5.6", "ct_liver", "2", "seg-series")
    with pytest.raises(ValueError, match="non-empty"):
        derived_uid()


def test_same_inputs_give_the_same_uids_and_another_model_others(study: Study, phantom: Phantom, seg: Any,
                                                                  tmp_path: Path) -> None:
    again = _seg(study, phantom)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (seg.SeriesInstanceUID, seg.SOPInstanceUID)
    assert [s.TrackingUID for s in again.SegmentSequence] == [s.TrackingUID for s in seg.SegmentSequence]
    first, second = _sr(seg, study, _findings()), _sr(again, study, _findings())
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (second.SeriesInstanceUID, second.SOPInstanceUID)
    uids = [g.tracking_uid for g in _reread(first, tmp_path / "a.dcm").content.get_volumetric_roi_measurement_groups()]
    assert uids == [g.tracking_uid for g in _reread(second, tmp_path / "b.dcm").content.get_volumetric_roi_measurement_groups()]
    assert len(set(uids)) == len(uids) == 3
    series, instance = _uids(study, "sc")
    picture = np.zeros((8, 8, 3), np.uint8)
    scs = [build_preview_sc(picture, study.dicom_files, series_instance_uid=series, sop_instance_uid=instance)
           for _ in range(2)]
    assert scs[0].SOPInstanceUID == scs[1].SOPInstanceUID == instance
    other = _seg(study, phantom, model="other_model")
    assert other.SOPInstanceUID != seg.SOPInstanceUID and other.SeriesInstanceUID != seg.SeriesInstanceUID
    random = build_seg(study.dicom_files, study.to_native(phantom.labels), PROVENANCE)  # no UIDs given: random ones
    assert random.SOPInstanceUID != build_seg(study.dicom_files, study.to_native(phantom.labels), PROVENANCE).SOPInstanceUID


@needs_dciodvfy
@pytest.mark.parametrize("tumors, reported", [(2, True), (0, True), (0, False)], ids=["tumors", "no-tumors", "not-reported"])
def test_sr_sc_and_seg_pass_dciodvfy(study: Study, phantom: Phantom, seg: Any, tmp_path: Path, tumors: int,
                                     reported: bool) -> None:
    findings = _findings(tumors, reported)
    seg.save_as(tmp_path / "seg.dcm")
    series, instance = _uids(study, "sr")
    write_sr(tmp_path / "sr.dcm", seg, study.dicom_files, findings, PROVENANCE, series_instance_uid=series,
             sop_instance_uid=instance)
    write_preview(tmp_path / "preview.png", study.ct, phantom.labels, study.spacing, findings["findings"])
    series, instance = _uids(study, "sc")
    build_preview_sc(tmp_path / "preview.png", study.dicom_files, series_instance_uid=series,
                     sop_instance_uid=instance).save_as(tmp_path / "sc.dcm")
    for name in ("seg.dcm", "sr.dcm", "sc.dcm"):
        assert dciodvfy_errors(tmp_path / name) == [], name


def test_sr_references_the_seg_and_the_source_series_and_belongs_to_the_study(study: Study, seg: Any,
                                                                              tmp_path: Path) -> None:
    sr = _reread(_sr(seg, study, _findings()), tmp_path / "sr.dcm")
    src = pydicom.dcmread(study.dicom_files[0], stop_before_pixels=True)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.Modality == "SR"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert groups
    for group in groups:
        assert group.roi is None  # the ROI is a segment, not coordinates
        segment = group.referenced_segment
        assert segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert segment[1].UID == src.SeriesInstanceUID
    evidence = {s.SeriesInstanceUID: [i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence]
                for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
    assert seg.SOPInstanceUID in evidence[seg.SeriesInstanceUID] and src.SeriesInstanceUID in evidence
    for ds in (sr, seg):
        assert (ds.StudyInstanceUID, ds.PatientID, ds.PatientName) == (src.StudyInstanceUID, src.PatientID, src.PatientName)
    assert int(sr.SeriesNumber) == int(src.SeriesNumber) + 1001 and sr.SeriesDescription == "medseg measurements"


def test_sr_measurements_equal_the_findings(study: Study, seg: Any, tmp_path: Path) -> None:
    from pydicom.sr.codedict import codes

    findings = _findings(2)
    report = _reread(_sr(seg, study, findings), tmp_path / "sr.dcm").content
    groups = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    assert sorted(groups) == ["liver", "tumor 1", "tumor 2"]
    liver = groups["liver"].get_measurements(name=codes.SCT.Volume)
    assert [(m.value, m.unit.value) for m in liver] == [(2550.32, "ml")]
    segment_of = {s.TrackingID: int(s.SegmentNumber) for s in seg.SegmentSequence}
    assert groups["liver"].referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == segment_of["liver"]
    for tumor in findings["findings"]["tumors"]:
        group = groups[f"tumor {tumor['id']}"]
        volume, = group.get_measurements(name=codes.SCT.Volume)
        diameter, = group.get_measurements(name=codes.SCT.LongAxis)
        assert (volume.value, volume.unit.value) == (tumor["volume_ml"], "ml")
        assert (diameter.value, diameter.unit.value) == (tumor["longest_axial_diameter_mm"], "mm")
        assert [site.value.value for site in group.finding_sites] == [SPEC.label("liver_tumor").region.value]  # type: ignore[union-attr]
        assert group.finding_type.value == SPEC.label("liver_tumor").type.value  # type: ignore[union-attr]
        assert (group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
                == segment_of["liver_tumor"])
        assert _text(group, CENTER_OF_MASS) == ["LPS mm: " + ", ".join(f"{v:.2f}" for v in tumor["centroid_lps_mm"])]
    status, = report.get_image_measurement_groups()
    assert status.tracking_identifier == "medseg status" and _text(status, COMMENT) == ["reported (ok): liver in view"]
    device, = report.get_observer_contexts()
    assert device.observer_type.value == codes.DCM.Device.value


def test_sr_without_tumors_measures_the_liver_only(study: Study, seg: Any, tmp_path: Path) -> None:
    report = _reread(_sr(seg, study, _findings(0)), tmp_path / "sr.dcm").content
    assert [g.tracking_identifier for g in report.get_volumetric_roi_measurement_groups()] == ["liver"]


def test_sr_of_nothing_reported_says_why_and_measures_nothing(study: Study, seg: Any, tmp_path: Path) -> None:
    findings = _findings(reported=False)
    report = _reread(_sr(seg, study, findings), tmp_path / "sr.dcm").content
    assert report.get_volumetric_roi_measurement_groups() == []
    status, = report.get_image_measurement_groups()
    assert _text(status, COMMENT) == ["nothing reported (liver_not_in_view): no liver in view: a chest scan"]
    assert status.get_measurements() == []
    inner = _reread(_sr(seg, study, findings["findings"]), tmp_path / "inner.dcm")  # the findings object alone: same
    assert _text(inner.content.get_image_measurement_groups()[0], COMMENT) == _text(status, COMMENT)


def test_sr_of_tumors_needs_a_tumor_segment(study: Study, phantom: Phantom) -> None:
    liver = (phantom.labels == SPEC.label("liver").value).astype(np.uint8)
    liver_only = build_seg(study.dicom_files, study.to_native(liver), PROVENANCE, classes=SPEC.labels[:2])
    with pytest.raises(ValueError, match="expected a segment tracked as 'liver_tumor'"):
        _sr(liver_only, study, _findings(1))


def test_preview_sc_holds_the_picture_in_the_source_study(study: Study, phantom: Phantom, tmp_path: Path) -> None:
    from PIL import Image

    findings = _findings(1)
    write_preview(tmp_path / "preview.png", study.ct, phantom.labels, study.spacing, findings["findings"])
    series, instance = _uids(study, "sc")
    build_preview_sc(tmp_path / "preview.png", study.dicom_files, series_instance_uid=series,
                     sop_instance_uid=instance).save_as(tmp_path / "sc.dcm")
    sc = pydicom.dcmread(tmp_path / "sc.dcm")
    src = pydicom.dcmread(study.dicom_files[0], stop_before_pixels=True)
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and sc.PhotometricInterpretation == "RGB"
    assert np.array_equal(sc.pixel_array, np.asarray(Image.open(tmp_path / "preview.png").convert("RGB")))
    assert (sc.StudyInstanceUID, sc.PatientID, sc.PatientName) == (src.StudyInstanceUID, src.PatientID, src.PatientName)
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == (series, instance)
    assert int(sc.SeriesNumber) == int(src.SeriesNumber) + 1002 and sc.SeriesDescription == "medseg preview"
    with pytest.raises(ValueError, match=r"expected an RGB picture.*\(8, 8\) uint8"):
        build_preview_sc(np.zeros((8, 8), np.uint8), study.dicom_files, series_instance_uid=series,
                         sop_instance_uid=instance)


def test_findings_are_not_changed_by_building_the_sr(study: Study, seg: Any) -> None:
    findings = _findings(2)
    before = copy.deepcopy(findings)
    _sr(seg, study, findings)
    assert findings == before


@needs_dciodvfy
def test_preview_sc_of_a_series_without_body_part_passes_dciodvfy(study: Study, tmp_path: Path) -> None:
    """Without Body Part Examined, the SC's Laterality is required: it goes empty (unknown)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.dicom_files]
    for ds in headers:
        del ds.BodyPartExamined
    series, instance = _uids(study, "sc")
    build_preview_sc(np.zeros((16, 16, 3), np.uint8), headers, series_instance_uid=series,
                     sop_instance_uid=instance).save_as(tmp_path / "sc.dcm")
    assert dciodvfy_errors(tmp_path / "sc.dcm") == []
