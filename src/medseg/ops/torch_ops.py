"""The preprocessing and postprocessing math in PyTorch, for GPU flavors (any torch device).

Same centred-grid convention as ``medseg.ops.preprocess`` (whose coordinate functions it reuses), so a
GPU flavor agrees with DALI and with the numpy reference; tested against both. In the postprocessing the
segmenter's outputs, the CT and the labels' way back to the study's grid stay on the device; the judging
(``medseg.ops.postprocess.judge``: regions, plausibility, connected components, lesion checks) runs on the host
on the small model grid, and the findings are measured from the uint8 labels by ``medseg.ops.postprocess``,
reading the CT only in the tumors' boxes.
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


class DeviceVolume:
    """A study's CT left where it is (a torch tensor, on a GPU in the GPU flavors): the postprocessing reads it
    through ``ModelGridHU`` (``gather``: the sparse lattice and the organ's box) and ``measure`` (``[box]``: each
    tumor's box), so only those voxels cross to the host, never the whole study."""

    def __init__(self, ct: Any) -> None:
        self.ct = ct
        self.shape = tuple(int(n) for n in ct.shape)

    def gather(self, index: Sequence[np.ndarray]) -> np.ndarray:
        """The voxels at the outer product of one index array per axis (as ``ct[np.ix_(*index)]``)."""
        import torch

        out = self.ct
        for axis, i in enumerate(index):
            out = out.index_select(axis, torch.as_tensor(np.asarray(i, np.int64), device=out.device))
        return out.cpu().numpy()  # type: ignore[no-any-return]

    def __getitem__(self, box: tuple[slice, ...]) -> np.ndarray:
        return self.ct[box].cpu().numpy()  # type: ignore[no-any-return]


def probabilities_box(probabilities: Any, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """(tumor probability, probability of the predicted class) inside ``box`` of the segmenter's (2, Z, Y, X) float16
    probabilities on the device, as float32 on the host: only the organ's box travels."""
    all_channels_box = (slice(None), *box)  # every channel, then the box (a name: 3.10 has no x[a, *b])
    p = probabilities[all_channels_box].float().cpu().numpy()
    return p[0], p[1]


def postprocess(labels: Any, probabilities: Any, grid: Sequence[int], ct: DeviceVolume,
                spacing: Sequence[float]) -> tuple[np.ndarray, Any]:
    """The postprocessing of the segmenter's outputs where they are (tensors on the device): the labels on the
    model grid (uint8, small) and the organ's box of the probabilities cross to the host for the judging
    (``medseg.ops.postprocess.judge``); the CT is read only where the judging looks; the labels go back onto the
    study's grid on the device. Returns (uint8 labels on the study's grid on the host, the verdict)."""
    import torch

    from medseg.ops.postprocess import ModelGridHU, judge, model_grid_labels

    verdict = judge(model_grid_labels(labels, probabilities, grid).cpu().numpy(), ModelGridHU(ct, spacing, grid),
                    lambda box: probabilities_box(probabilities, box))
    full = to_input_grid(torch.from_numpy(verdict.labels).to(labels.device), ct.shape, spacing)
    return full.cpu().numpy(), verdict
