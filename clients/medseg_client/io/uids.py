"""Deterministic DICOM UIDs: the same parts always give the same UID, so a retried job resends identical objects."""

from __future__ import annotations

import json
import uuid


def derived_uid(*parts: str) -> str:
    """A "2.25." UID (a name-based UUID, ISO/IEC 9834-8) of ``parts``, e.g. study UID, series UID, model name,
    version, "seg-series": the same parts give the same UID, different parts different ones.

    (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and is random, hence this.)"""
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"derived_uid needs one or more non-empty strings, got {parts!r}")
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, json.dumps(list(parts))).int}"
