"""Checks a study against the spec's bounds before any heavy work, on the client and in the server."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from medseg_client.errors import StudyError
from medseg_client.spec import SPEC, model_grid_shape


def check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Return the spacing as three floats, or refuse it with the reason."""
    values = [float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1)]
    if len(values) != 3:
        raise StudyError(f"spacing must have 3 values (z, y, x in mm), got {len(values)}")
    lo, hi = SPEC.spacing_range
    for axis, s in zip("zyx", values, strict=True):
        if not math.isfinite(s) or not lo <= s <= hi:
            raise StudyError(f"spacing along {axis} must be a finite number in [{lo}, {hi}] mm, got {s}")
    return values[0], values[1], values[2]


def check_study(shape: Sequence[int], dtype: np.dtype | str, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Refuse a volume the ensemble cannot take; return its model-grid shape if it is acceptable."""
    if np.dtype(dtype) != SPEC.ensemble.input("CT").numpy_dtype:
        raise StudyError(f"CT volume must be int16 Hounsfield units, got dtype {np.dtype(dtype)}")
    if len(shape) != 3:
        raise StudyError(f"CT volume must be 3-D (z, y, x), got shape {tuple(shape)}")
    for axis, n, lo, hi in zip("zyx", shape, SPEC.min_input_shape, SPEC.max_input_shape, strict=True):
        if not lo <= n <= hi:
            raise StudyError(f"CT volume size along {axis} must be in [{lo}, {hi}], got {n} (shape {tuple(shape)})")
    voxels = math.prod(shape)
    if voxels > SPEC.max_input_voxels:
        raise StudyError(f"CT volume has {voxels} voxels, more than the limit of {SPEC.max_input_voxels}")
    sp = check_spacing(spacing)
    grid = model_grid_shape(tuple(shape), sp)
    for axis, n, lo, hi, m in zip("zyx", grid, SPEC.min_model_grid, SPEC.max_model_grid, SPEC.model_spacing, strict=True):
        if not lo <= n <= hi:
            raise StudyError(
                f"study extent along {axis} is {n * m:.0f} mm; the model covers {lo * m:.0f} to {hi * m:.0f} mm"
            )
    return grid
