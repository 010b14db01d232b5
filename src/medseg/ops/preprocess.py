"""Preprocessing math in plain numpy: the HU window and resampling to the model grid.

The served pipeline is DALI's (``medseg.ops.dali_pipeline``); these functions state the same math so
that tests can check DALI against it and GPU flavors can reproduce it.
Grids are centred: the model grid (n_out voxels of m mm) is centred on the study's extent (n_in
voxels of s mm), as DALI's resize does for a fractional size, so output voxel i has its centre at
input index (n_in - n_out * m / s) / 2 + (i + 0.5) * m / s - 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg_client.spec import SPEC, model_grid_shape, padded_shape


def window(hu: np.ndarray) -> np.ndarray:
    """Clip Hounsfield units to the spec's window and scale it to 0..1 (float32)."""
    lo, hi = SPEC.hu_window
    out = np.clip(hu.astype(np.float32), lo, hi)
    out -= lo
    out *= np.float32(1.0 / (hi - lo))
    return out


def source_coordinate(position: Any, n_out: int, scale: float, n_in: int) -> Any:
    """The input-index coordinate of output-index ``position`` (a number or an array; fractional for a point
    inside a voxel), the output grid centred on the input's ``n_in`` voxels and ``scale`` input voxels a step."""
    return (n_in - n_out * scale) / 2.0 + (position + 0.5) * scale - 0.5


def source_coordinates(n_out: int, scale: float, n_in: int) -> np.ndarray:
    """Input-index coordinates of the centres of ``n_out`` output voxels, ``scale`` input voxels apart."""
    coords = source_coordinate(np.arange(n_out, dtype=np.float64), n_out, scale, n_in)
    return np.clip(coords, 0.0, n_in - 1)


def target_indices(n_in: int, scale: float, n_out: int) -> np.ndarray:
    """For each of ``n_in`` study voxels, the model-grid voxel whose cell holds its centre (nearest)."""
    offset = (n_in - n_out * scale) / 2.0
    idx = np.floor((np.arange(n_in, dtype=np.float64) + 0.5 - offset) / scale).astype(np.int64)
    return np.clip(idx, 0, n_out - 1)


def _linear_axis(vol: np.ndarray, axis: int, n_out: int, scale: float) -> np.ndarray:
    coords = source_coordinates(n_out, scale, vol.shape[axis])
    i0 = np.floor(coords).astype(np.int64)
    i1 = np.minimum(i0 + 1, vol.shape[axis] - 1)
    w1 = (coords - i0).astype(np.float32)
    shape = [1] * vol.ndim
    shape[axis] = n_out
    w1 = w1.reshape(shape)
    a = np.take(vol, i0, axis=axis)
    b = np.take(vol, i1, axis=axis)
    return a + (b - a) * w1


def resample_linear(vol: np.ndarray, spacing: Sequence[float], out_spacing: Sequence[float]) -> np.ndarray:
    """Separable linear resampling of a (z, y, x) volume from ``spacing`` to ``out_spacing`` (float32)."""
    out_shape = model_grid_shape(vol.shape, tuple(spacing)) if tuple(out_spacing) == SPEC.model_spacing else None
    out = vol.astype(np.float32)
    for axis in range(3):
        n = out_shape[axis] if out_shape else int(np.floor(vol.shape[axis] * spacing[axis] / out_spacing[axis] + 0.5))
        out = _linear_axis(out, axis, n, out_spacing[axis] / spacing[axis])
    return out


# DALI worker threads: on the GPU they only feed the device (the GPU flavor's config and dali.py); on the CPU they do
# the resampling, two for the 2-core machines this flavor is sized for (the cpu flavor's config, offline callers)
GPU_THREADS, CPU_THREADS = 4, 2

PAD_VALUE = 0.0  # windowed intensity of the padding (the window's low end): what the network sees past a scan's ends


def pad_to_divisor(vol: np.ndarray, value: float = PAD_VALUE) -> np.ndarray:
    """Pad a (z, y, x) volume at its far ends up to the network's size divisor."""
    target = padded_shape(vol.shape)  # type: ignore[arg-type]
    pads = [(0, t - n) for t, n in zip(target, vol.shape, strict=True)]
    return np.pad(vol, pads, constant_values=value)


def preprocess_reference(ct: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The whole preprocessing in numpy: (1, Z, Y, X) padded network input and the unpadded grid."""
    resampled = resample_linear(ct, spacing, SPEC.model_spacing)
    grid = resampled.shape
    image = pad_to_divisor(window(resampled))
    return image[None], (grid[0], grid[1], grid[2])
