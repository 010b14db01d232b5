"""DICOM SEG output (highdicom): one segment per label, referencing the source CT series.

Each segment carries its coded anatomy from the spec, Segment Algorithm Type AUTOMATIC and the
algorithm's identification: name, model version, and the weights' and ONNX model's sha256.
The sources' headers go through the reader's ``repair_headers`` first, so a series an anonymizer left
with blank UIDs gets a SEG that references the very UIDs the reader reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg_client.errors import ArtifactError
from medseg_client.io.studies import repair_headers
from medseg_client.io.uids import derived_uid
from medseg_client.spec import SPEC, Code, Label

MANUFACTURER = "medseg"


def _concept(code: Code) -> Any:
    from highdicom.sr.coding import CodedConcept

    return CodedConcept(code.value, code.scheme, code.meaning)


def source_headers(sources: Sequence[Path | Any]) -> list[Any]:
    """The distinct source headers, in order, repaired: files are read (headers only), datasets (the
    reader's ``Study.dicom_headers``) used as they are."""
    import pydicom

    unique: dict[Any, Path | Any] = {}
    for s in sources:
        unique.setdefault(s if isinstance(s, Path) else id(s), s)
    headers = [(s, pydicom.dcmread(s, stop_before_pixels=True)) if isinstance(s, Path)
               else (Path(str(getattr(s, "filename", None) or "source")), s) for s in unique.values()]
    repair_headers(headers)
    return [ds for _, ds in headers]


def build_seg(source_files: Sequence[Path | Any], labels_native: np.ndarray, provenance: dict[str, Any],
              frame_indices: list[int] | None = None, classes: Sequence[Label] = SPEC.labels,
              description: str = "medseg liver and liver tumor", *, series_instance_uid: str | None = None,
              sop_instance_uid: str | None = None) -> Any:
    """A binary Segmentation of ``labels_native`` ((i, j, k) = (column, row, slice)); slice k comes from
    ``source_files[k]``, a file or its header (frame ``frame_indices[k]`` of it, for a multi-frame source).

    ``series_instance_uid`` and ``sop_instance_uid`` are random unless given; given a series UID, the segments'
    tracking UIDs derive from it, so a retried job that passes the same UIDs resends a SEG with the same UIDs."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = source_headers(source_files)  # highdicom needs headers only
    if labels_native.shape != (int(sources[0].Columns), int(sources[0].Rows), len(source_files)):
        raise ValueError(f"labels of shape {labels_native.shape} do not fit {len(source_files)} slices of "
                         f"{sources[0].Rows}x{sources[0].Columns}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medseg {provenance.get('ensemble', SPEC.ensemble.name)}",
        family=codes.cid7162.ArtificialIntelligence,
        version=f"model {provenance.get('version', SPEC.segmenter.version)}, spec {SPEC.version}",
        source=MANUFACTURER,
        parameters={"weights_sha256": str(provenance.get("weights_sha256", "")),
                    "onnx_sha256": str(provenance.get("onnx_sha256", ""))},
    )
    segments = [label for label in classes if label.value != 0]
    uncoded = [label.name for label in segments if label.category is None or label.type is None]
    if uncoded:
        raise ArtifactError(f"no DICOM SEG: labels without DICOM codes in the model card: {', '.join(uncoded)} "
                            "(give them with `medseg import ... --label-codes FILE`)")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=label.display,
            segmented_property_category=_concept(label.category),  # type: ignore[arg-type]
            segmented_property_type=_concept(label.type),  # type: ignore[arg-type]
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID() if series_instance_uid is None else derived_uid(series_instance_uid, "segment", str(n)),
            tracking_id=f"{label.name}",
            anatomic_regions=[_concept(label.region)] if label.region and label.region != label.type else None,
        )
        for n, label in enumerate(segments, start=1)
    ]
    # (slices, rows, columns, segments) binary masks, in the order of the source frames
    frames = labels_native.transpose(2, 1, 0)
    if len(sources) == 1 and len(source_files) > 1:  # one multi-frame source: back to its frame order
        order = np.empty(len(source_files), np.int64)
        order[np.asarray(frame_indices if frame_indices is not None else range(len(source_files)))] = np.arange(
            len(source_files))
        frames = frames[order]
    # a label map of segment numbers (segments cannot overlap): highdicom checks it by its maximum, where a 4-D stack
    # of binary masks costs a sum over a length-2 last axis of every voxel (2 s of a 5 s SEG on a 179-slice series)
    numbers = np.zeros(256, np.uint8)
    numbers[[label.value for label in segments]] = np.arange(1, len(segments) + 1)
    label_map = frames if all(label.value == n for n, label in enumerate(segments, start=1)) else numbers[frames]
    first = sources[0]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(label_map, np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=int(first.get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=str(provenance.get("ensemble", SPEC.ensemble.name)),
        software_versions=f"medseg {SPEC.version}",
        device_serial_number=str(provenance.get("weights_sha256", "unknown"))[:16],
        series_description=description[:64],
        omit_empty_frames=False,
    )


def write_seg(path: Path, source_files: Sequence[Path | Any], labels_native: np.ndarray, provenance: dict[str, Any],
              frame_indices: list[int] | None = None, classes: Sequence[Label] = SPEC.labels,
              description: str = "medseg liver and liver tumor", *, series_instance_uid: str | None = None,
              sop_instance_uid: str | None = None) -> None:
    """Build and save the SEG (UIDs as in ``build_seg``)."""
    build_seg(source_files, labels_native, provenance, frame_indices, classes, description,
              series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid).save_as(path)
