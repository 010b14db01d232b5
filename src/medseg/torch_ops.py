"""The preprocessing and postprocessing math in PyTorch, for GPU flavors (any torch device).

Same centred-grid convention as ``medseg.preprocess`` (whose coordinate functions it reuses), so a
GPU flavor agrees with DALI and with the numpy reference; tested against both. Connected components
run on a CUDA device by label propagation in PyTorch (no CuPy: its releases for CUDA 13 need numpy 2,
which the python backend's stub cannot read) and in scipy on the CPU; only the uint8 labels leave the
device, and the findings are measured from them by ``medseg.postprocess``.
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


def logits_to_labels(logits: Any, grid: Sequence[int]) -> Any:
    """Argmax over classes of (C, Z, Y, X) logits, cropped to the unpadded model grid (uint8, on the device)."""
    import torch

    if logits.ndim != 4 or logits.shape[0] != SPEC.num_classes:
        raise ValueError(f"logits must be (classes={SPEC.num_classes}, z, y, x), got shape {tuple(logits.shape)}")
    z, y, x = (int(g) for g in grid)
    if z > logits.shape[1] or y > logits.shape[2] or x > logits.shape[3]:
        raise ValueError(f"model grid {tuple(grid)} exceeds the logits' spatial shape {tuple(logits.shape[1:])}")
    return logits[:, :z, :y, :x].argmax(dim=0).to(torch.uint8)


MAX_PASSES = 4096  # propagation passes on the device before a (maze-like) mask is finished on the host
CHECK_EVERY = 16  # passes between convergence checks (each check waits for the device)


def _components_on_device(mask: Any, max_passes: int = MAX_PASSES) -> Any | None:
    """26-connected component ids of a boolean tensor on its own device, by propagating the smallest voxel
    index through 3x3x3 neighbourhoods until nothing changes: a component's id is its first voxel in raster
    order plus one, the order scipy numbers them in. None if ``max_passes`` did not settle it (the passes
    needed grow with a component's longest path)."""
    import torch
    import torch.nn.functional as F

    dtype = torch.float32 if mask.numel() < 1 << 24 else torch.float64  # voxel indices held exactly
    index = torch.arange(1, mask.numel() + 1, device=mask.device, dtype=dtype).reshape(1, 1, *mask.shape)
    fg = mask[None, None]
    neg = torch.where(fg, -index, torch.full_like(index, float("-inf")))  # max pooling of -id: the smallest id
    for _ in range(0, max_passes, CHECK_EVERY):
        before = neg
        for _ in range(CHECK_EVERY):
            neg = torch.where(fg, F.max_pool3d(neg, 3, stride=1, padding=1), neg)
        if torch.equal(neg, before):
            return torch.where(fg, -neg, torch.zeros_like(neg))[0, 0].to(torch.int64)
    return None


def _components(mask: Any) -> Any:
    """26-connected component ids (int64, 0 = background, numbered in raster order of their first voxel):
    on a CUDA device by propagation in PyTorch, with scipy on the host (CPU tensors, or a mask too
    convoluted to settle on the device)."""
    import torch

    if mask.device.type == "cuda":
        box = _bounding_box(mask)
        if box is None:
            return torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
        inner = _components_on_device(mask[box])
        if inner is not None:
            comp = torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
            comp[box] = inner
            return comp
    from scipy import ndimage

    comp, _ = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3, 3), bool))
    return torch.from_numpy(comp.astype(np.int64)).to(mask.device)


def _bounding_box(mask: Any) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of a 3-D tensor (None if there is none)."""
    box = []
    for axis in range(3):
        hit = mask.any(dim=tuple(a for a in range(3) if a != axis)).nonzero()
        if hit.numel() == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def keep_liver_and_its_tumors(labels: Any) -> Any:
    """Keep the largest connected organ (liver + tumor voxels), as ``medseg.postprocess`` does, on the device
    (a tie goes to the component met first in raster order, as there)."""
    import torch

    comp = _components(labels > 0)
    ids, sizes = torch.unique(comp[comp > 0], sorted=True, return_counts=True)
    if ids.numel() == 0:
        return torch.zeros_like(labels)
    return torch.where(comp == ids[sizes.argmax()], labels, torch.zeros_like(labels))


def labels_on_input_grid(logits: Any, grid: Sequence[int], input_shape: Sequence[int], spacing: Sequence[float]) -> Any:
    """The device half of the postprocessing: clean uint8 labels on the study's grid, still on the device."""
    return to_input_grid(keep_liver_and_its_tumors(logits_to_labels(logits, grid)), input_shape, spacing)
