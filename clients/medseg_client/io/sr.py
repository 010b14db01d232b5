"""DICOM SR measurement report (TID 1500, Comprehensive 3D SR) of a job's findings, referencing its SEG.

A PACS shows the numbers of findings.json where a radiologist reads: the liver's volume and each listed tumor's
volume and longest axial diameter, each group pointing at its segment of the SEG and at the source CT series.

Structure (root CONTAINER "Imaging Measurement Report", TID 1500):

- observer: a device (TID 1004): medseg, the ensemble's name as model name, UID derived from the model's identity;
  procedure reported: (SCT 363679005) "Imaging procedure";
- one TID 1501 group "medseg status": (DCM 121106) "Comment" TEXT, what was decided and why (reported or not);
- if reported and the liver found: a TID 1411 group "liver": (SCT 118565006) "Volume" in ml, finding = the SEG liver
  segment's property type, referencing that segment (with the source series);
- for each listed tumor (when reported): a TID 1411 group "tumor N": "Volume" in ml and (SCT 103339001) "Long axis"
  in mm (the longest axial diameter), finding site = the tumor segment's anatomic region (liver), referencing the
  SEG's tumor segment; its centroid as a TEXT qualitative evaluation (TID 1411 row "coded questions with coded or
  text answers") named (DCM 128138) "Center of Mass", value "LPS mm: x, y, z" (highdicom refuses coordinates
  inside a volumetric group's measurements, and the group's one ROI reference is the segment).

Every group carries the algorithm's identification (TID 4019) as the SEG's segments do, and a tracking UID derived
from the SR's series UID, so a retried job resends a report with the same UIDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg_client.io.seg import MANUFACTURER
from medseg_client.io.seg import source_headers as read_headers
from medseg_client.io.uids import derived_uid
from medseg_client.spec import SPEC

SERIES_NUMBER_OFFSET = 1001  # the source's series number plus this (the SEG takes +1000, the preview +1002)
SERIES_DESCRIPTION = "medseg measurements"
# units (UCUM), as coded in DICOM SR
MILLILITER = ("ml", "UCUM", "milliliter")
MILLIMETER = ("mm", "UCUM", "millimeter")


def _findings_part(findings: dict[str, Any]) -> dict[str, Any]:
    """The findings themselves: a findings.json document's ``findings``, or the findings given directly."""
    inner = findings.get("findings", findings)
    if not isinstance(inner, dict):
        raise ValueError(f"findings: expected a findings.json document or its 'findings' object, got {type(inner).__name__}")
    return inner


def _segment(seg: Any, name: str) -> Any:
    """The SEG's segment whose Tracking ID is the label ``name`` (build_seg writes the label's name there)."""
    for segment in seg.SegmentSequence:
        if str(segment.get("TrackingID", "")) == name:
            return segment
    found = [str(s.get("TrackingID", "")) for s in seg.SegmentSequence]
    raise ValueError(f"SEG {seg.SOPInstanceUID}: expected a segment tracked as {name!r}, found {found}")


def _code(item: Any) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def build_sr(seg: Any, source_headers: Sequence[Path | Any], findings: dict[str, Any], provenance: dict[str, Any], *,
             series_instance_uid: str, sop_instance_uid: str) -> Any:
    """The Comprehensive 3D SR (TID 1500) of ``findings`` (a findings.json document, or its ``findings``) for the SEG
    ``seg`` built from the source series whose files or headers are ``source_headers``; ``provenance`` is the model's
    (as for the SEG). Structure and codes: see the module's docstring."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = read_headers(source_headers)
    if not sources:
        raise ValueError("build_sr: expected the source series' files or headers, got none")
    first = sources[0]
    if str(seg.StudyInstanceUID) != str(first.StudyInstanceUID):
        raise ValueError(f"build_sr: the SEG belongs to study {seg.StudyInstanceUID}, the sources to {first.StudyInstanceUID}")
    found = _findings_part(findings)
    status = found.get("status") or {}
    liver_found = bool(found.get("liver", {}).get("found"))
    reported = bool(status.get("reported", liver_found))
    ensemble = str(provenance.get("ensemble", SPEC.ensemble.name))
    version = str(provenance.get("version", SPEC.segmenter.version))
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"medseg {ensemble}", version=f"model {version}, spec {SPEC.version}",
        parameters=[f"weights_sha256={provenance.get('weights_sha256', '')}",
                    f"onnx_sha256={provenance.get('onnx_sha256', '')}"])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("medseg-device", ensemble, version, str(provenance.get("weights_sha256", ""))),
            name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=f"{ensemble} {version}"))
    source_series = str(first.SeriesInstanceUID)

    def tracking(name: str) -> Any:
        return hd.sr.TrackingIdentifier(uid=derived_uid(series_instance_uid, "tracking", name), identifier=name)

    def text(name: Any, value: str) -> Any:
        return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)

    def referenced(segment: Any) -> Any:
        return hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=int(segment.SegmentNumber),
            source_series=hd.sr.SourceSeriesForSegmentation(source_series))

    if status:
        note = f"{'reported' if status.get('reported') else 'nothing reported'} ({status.get('code', '?')}): " \
               f"{status.get('reason', '')}"
    else:
        note = "reported: liver found" if liver_found else "nothing reported: no liver found"
    status_group = hd.sr.MeasurementsAndQualitativeEvaluations(tracking_identifier=tracking("medseg status"),
                                                               algorithm_id=algorithm)
    status_group[0].ContentSequence.append(text(codes.DCM.Comment, note))
    groups: list[Any] = [status_group]
    if reported and liver_found:
        liver = _segment(seg, SPEC.label("liver").name)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking("liver"),
            referenced_segment=referenced(liver),
            finding_category=_code(liver.SegmentedPropertyCategoryCodeSequence[0]),
            finding_type=_code(liver.SegmentedPropertyTypeCodeSequence[0]),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=float(found["liver"]["volume_ml"]),
                                            unit=hd.sr.CodedConcept(*MILLILITER))]))
    tumors = found.get("tumors", []) if reported else []
    if tumors:
        tumor_segment = _segment(seg, SPEC.label("liver_tumor").name)
        regions = tumor_segment.get("AnatomicRegionSequence")
        site = _code(regions[0]) if regions else codes.SCT.Liver
        for tumor in tumors:
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(f"tumor {tumor['id']}"),
                referenced_segment=referenced(tumor_segment),
                finding_category=_code(tumor_segment.SegmentedPropertyCategoryCodeSequence[0]),
                finding_type=_code(tumor_segment.SegmentedPropertyTypeCodeSequence[0]),
                finding_sites=[hd.sr.FindingSite(site)],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(name=codes.SCT.Volume, value=float(tumor["volume_ml"]),
                                      unit=hd.sr.CodedConcept(*MILLILITER)),
                    hd.sr.Measurement(name=codes.SCT.LongAxis, value=float(tumor["longest_axial_diameter_mm"]),
                                      unit=hd.sr.CodedConcept(*MILLIMETER))])
            centroid = tumor.get("centroid_lps_mm")
            if centroid is not None:
                group[0].ContentSequence.append(
                    text(codes.DCM.CenterOfMass, "LPS mm: " + ", ".join(f"{float(v):.2f}" for v in centroid)))
            groups.append(group)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg],
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=int(first.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=ensemble,
        software_versions=f"medseg {SPEC.version}",
    )


def write_sr(path: Path, seg: Any, source_headers: Sequence[Path | Any], findings: dict[str, Any],
             provenance: dict[str, Any], *, series_instance_uid: str, sop_instance_uid: str) -> None:
    """Build and save the SR (as ``build_sr``)."""
    build_sr(seg, source_headers, findings, provenance, series_instance_uid=series_instance_uid,
             sop_instance_uid=sop_instance_uid).save_as(path)
