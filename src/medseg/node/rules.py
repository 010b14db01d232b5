"""Routing: what a received series is (from its first instance's header and what arrived) and which rule takes it.

Pure functions over plain values: the receiver records a ``SeriesInfo``, ``decide`` returns the model or the reason
to skip. Localizers and non-image objects never become jobs, whatever the rules say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from medseg.node.config import PRIORITIES, Route

# SOP classes whose instances are pixel images a CT model could read (CT, enhanced CT, legacy converted CT, MR,
# enhanced MR, PET, ...): anything else (SR, SEG, presentation states, key objects, RT structures, encapsulated
# documents, raw data) is not a series to segment
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.128": "PET Image",
}
OWN_MANUFACTURER = "medseg"  # what the node's SEG, SR and preview carry: results forwarded back are never jobs


@dataclass(frozen=True)
class SeriesInfo:
    """What routing looks at: header values of the series' first instance and how many arrived, from whom."""

    sop_class_uid: str
    modality: str
    body_part: str
    description: str
    image_type: tuple[str, ...]
    slice_thickness_mm: float | None
    images: int  # frames received (an instance of a multi-frame CT counts its frames)
    calling_ae_title: str
    called_ae_title: str
    manufacturer: str = ""


@dataclass(frozen=True)
class Decision:
    """A route's verdict: ``model`` to run (with its priority and destinations) or ``skip`` with the reason."""

    route: str
    model: str | None = None
    priority: str = "routine"
    destinations: tuple[str, ...] = ()
    skip: str | None = None


def header_info(ds: Any) -> dict[str, Any]:
    """The routing attributes of one instance's header (a pydicom Dataset), as stored with its series."""
    def text(keyword: str) -> str:
        value = ds.get(keyword, "")
        return "" if value is None else str(value).strip()

    thickness = ds.get("SliceThickness", None)
    try:
        thickness_mm = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_mm = None
    image_type = ds.get("ImageType", None)
    try:
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        frames = 1
    return {"sop_class_uid": text("SOPClassUID"), "modality": text("Modality").upper(), "frames": frames,
            "manufacturer": text("Manufacturer"),
            "body_part": text("BodyPartExamined").upper(), "description": text("SeriesDescription"),
            "image_type": [str(v).upper() for v in (image_type or [])] if not isinstance(image_type, str)
            else [image_type.upper()],
            "slice_thickness_mm": thickness_mm}


def never_a_job(info: SeriesInfo) -> str | None:
    """Why this series can never be segmented, whatever the rules: a localizer or not an image; else None."""
    if info.sop_class_uid not in IMAGE_SOP_CLASSES:
        return f"not an image series to segment (SOP class {info.sop_class_uid or 'missing'})"
    if info.manufacturer == OWN_MANUFACTURER:
        return "medseg's own result (Manufacturer medseg)"
    if "LOCALIZER" in info.image_type or "SCOUT" in info.image_type:
        return "a localizer (ImageType " + "\\".join(info.image_type) + ")"
    return None


def _matches(match: dict[str, Any], info: SeriesInfo) -> bool:
    for key, want in match.items():
        if key == "Modality" and info.modality != str(want).upper():
            return False
        if key == "BodyPartExamined" and info.body_part != str(want).upper():
            return False
        if key == "SeriesDescription" and not re.search(str(want), info.description):
            return False
        if key == "min_images" and info.images < int(want):
            return False
        if key == "max_images" and info.images > int(want):
            return False
        if key in ("min_slice_thickness_mm", "max_slice_thickness_mm"):
            if info.slice_thickness_mm is None:
                return False
            low = key.startswith("min")
            if (low and info.slice_thickness_mm < float(want)) or (not low and info.slice_thickness_mm > float(want)):
                return False
        if key == "calling_ae_title" and info.calling_ae_title != str(want):
            return False
        if key == "called_ae_title" and info.called_ae_title != str(want):
            return False
    return True


def decide(routes: tuple[Route, ...], info: SeriesInfo, arrived_priority: str) -> Decision:
    """The first matching rule's verdict; localizers and non-images are skipped before any rule, and a series no
    rule matches is skipped saying so. ``arrived_priority`` (from the called AE title or the C-STORE priority)
    holds unless the rule sets one; STAT from either source wins."""
    reason = never_a_job(info)
    if reason is not None:
        return Decision(route="(built in)", skip=reason)
    for route in routes:
        if not _matches(route.match, info):
            continue
        if route.skip is not None:
            return Decision(route=route.name, skip=route.skip)
        priority = min(route.priority or arrived_priority, arrived_priority, key=PRIORITIES.__getitem__)
        return Decision(route=route.name, model=route.model, priority=priority, destinations=route.destinations)
    what = f"{info.modality or 'no modality'}, {info.body_part or 'no body part'}, {info.images} image(s)"
    return Decision(route="(none)", skip=f"no routing rule matches ({what})")
