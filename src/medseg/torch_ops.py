"""The preprocessing and label-resampling math in PyTorch, for GPU flavors (any torch device).

Same centred-grid convention as ``medseg.preprocess`` (whose coordinate functions it reuses), so a
GPU flavor agrees with DALI and with the numpy reference; tested on the CPU against both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.preprocess import source_coordinates, target_indices
from medseg.spec import SPEC, model_grid_shape, padded_shape


def window(hu: Any) -> Any:
    """Clip HU to the spec's window and scale to 0..1 (float32 tensor)."""
    lo, hi = SPEC.hu_window
    return (hu.float().clamp(lo, hi) - lo) * (1.0 / (hi - lo))


def _linear_axis(vol: Any, axis: int, n_out: int, scale: float) -> Any:
    import torch

    coords = source_coordinates(n_out, scale, vol.shape[axis])
    i0 = np.floor(coords).astype(np.int64)
    i1 = np.minimum(i0 + 1, vol.shape[axis] - 1)
    shape = [1] * vol.ndim
    shape[axis] = n_out
    w1 = torch.as_tensor((coords - i0).astype(np.float32), device=vol.device).reshape(shape)
    a = vol.index_select(axis, torch.as_tensor(i0, device=vol.device))
    b = vol.index_select(axis, torch.as_tensor(i1, device=vol.device))
    return a + (b - a) * w1


def preprocess(ct: Any, spacing: Sequence[float]) -> tuple[Any, tuple[int, int, int]]:
    """(1, Z, Y, X) padded network input and the unpadded model grid, from an int16 (z, y, x) tensor."""
    import torch.nn.functional as F

    grid = model_grid_shape(tuple(ct.shape), tuple(spacing))
    vol = ct.float()
    for axis in range(3):
        vol = _linear_axis(vol, axis, grid[axis], SPEC.model_spacing[axis] / float(spacing[axis]))
    vol = window(vol)
    target = padded_shape(grid)
    vol = F.pad(vol, (0, target[2] - grid[2], 0, target[1] - grid[1], 0, target[0] - grid[0]))
    return vol[None], grid


def to_input_grid(labels: Any, input_shape: Sequence[int], spacing: Sequence[float]) -> Any:
    """Nearest-neighbour labels on the study's grid from labels on the model grid (a gather on the device)."""
    import torch

    out = labels
    for axis, n_in in enumerate(input_shape):
        idx = target_indices(int(n_in), SPEC.model_spacing[axis] / float(spacing[axis]), labels.shape[axis])
        out = out.index_select(axis, torch.as_tensor(idx, device=labels.device))
    return out
