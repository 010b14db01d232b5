"""The preprocessing and postprocessing math in PyTorch, for GPU flavors (any torch device).

Same centred-grid convention as ``medseg.ops.preprocess`` (whose coordinate functions it reuses), so a
GPU flavor agrees with DALI and with the numpy reference; tested against both. In the postprocessing the
argmax, the probabilities and the labels' way back to the study's grid stay on the device; the judging
(``medseg.ops.postprocess.judge``: regions, plausibility, connected components, lesion checks) runs on the host
on the small model grid, and the findings are measured from the uint8 labels by ``medseg.ops.postprocess``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.ops.preprocess import PAD_VALUE, source_coordinates, target_indices
from medseg_client.spec import SPEC, model_grid_shape, padded_shape


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
    vol = F.pad(vol, (0, target[2] - grid[2], 0, target[1] - grid[1], 0, target[0] - grid[0]), value=PAD_VALUE)
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


def softmax_box(logits: Any, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """(tumor probability, probability of the predicted class) of (C, Z, Y, X) logits inside ``box``, computed on
    the device, returned to the host (float32): only the organ's box travels."""
    all_channels_box = (slice(None), *box)  # every channel, then the box (a name: 3.10 has no x[a, *b])
    p = logits[all_channels_box].float().softmax(dim=0)
    return p[SPEC.label("liver_tumor").value].cpu().numpy(), p.max(dim=0).values.cpu().numpy()


def postprocess(logits: Any, grid: Sequence[int], ct: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, Any]:
    """The postprocessing with the heavy arrays on the device: argmax and the probabilities there, the judging
    (``medseg.ops.postprocess.judge``, on the small model grid) on the host, labels back onto the study's grid on
    the device; returns (uint8 labels on the study's grid on the host, the verdict)."""
    import torch

    from medseg.ops.postprocess import ModelGridHU, judge

    labels = logits_to_labels(logits, grid).cpu().numpy()
    verdict = judge(labels, ModelGridHU(ct, spacing, grid), lambda box: softmax_box(logits, box))
    full = to_input_grid(torch.from_numpy(verdict.labels).to(logits.device), ct.shape, spacing)
    return full.cpu().numpy(), verdict
