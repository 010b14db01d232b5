"""The preview montage (preview.png) as a DICOM Secondary Capture, so a PACS shows it beside the study it depicts.

Same patient and study as the source series; its own series (source series number + 1002, "medseg preview").
The montage mixes axial and coronal panels, so it has no one patient orientation: Patient Orientation is left
empty (Type 2), where a single value would be wrong for some of its panels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg_client.io.seg import MANUFACTURER
from medseg_client.io.seg import source_headers as read_headers
from medseg_client.spec import SPEC

SERIES_NUMBER_OFFSET = 1002  # the source's series number plus this (the SEG takes +1000, the SR +1001)
SERIES_DESCRIPTION = "medseg preview"


def _rgb(image: Path | np.ndarray) -> np.ndarray:
    """An (rows, columns, 3) uint8 array from a picture file or an array of that shape."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as picture:
            return np.asarray(picture.convert("RGB"), np.uint8)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"preview: expected an RGB picture, (rows, columns, 3) uint8, got {array.shape} {array.dtype}")
    return array


def build_preview_sc(image: Path | np.ndarray, source_headers: Sequence[Path | Any], *, series_instance_uid: str,
                     sop_instance_uid: str) -> Any:
    """A Secondary Capture image (RGB) of ``image`` (a PNG's path, or an RGB uint8 array) in the study of the source
    series whose files or headers are ``source_headers``."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    sources = read_headers(source_headers)
    if not sources:
        raise ValueError("build_preview_sc: expected the source series' files or headers, got none")
    first = sources[0]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=first,
        pixel_array=np.ascontiguousarray(_rgb(image)),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=int(first.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "P"),  # required by highdicom for PATIENT; emptied below (a montage)
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        software_versions=f"medseg {SPEC.version}",
    )
    sc.PatientOrientation = []  # empty
    if first.get("BodyPartExamined"):  # the study's body part: without it, Laterality is required
        sc.BodyPartExamined = first.BodyPartExamined
    else:
        sc.Laterality = ""  # unknown (Type 2C, empty)
    sc.BurnedInAnnotation = "NO"  # slice numbers, tumor numbers and volumes: nothing that identifies the patient
    sc.DerivationDescription = f"medseg preview of series {first.SeriesInstanceUID}"[:1024]
    return sc


def write_preview_sc(path: Path, image: Path | np.ndarray, source_headers: Sequence[Path | Any], *,
                     series_instance_uid: str, sop_instance_uid: str) -> None:
    """Build and save the Secondary Capture (as ``build_preview_sc``)."""
    build_preview_sc(image, source_headers, series_instance_uid=series_instance_uid,
                     sop_instance_uid=sop_instance_uid).save_as(path)
