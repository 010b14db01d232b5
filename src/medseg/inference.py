"""Running the segmenter: ONNX Runtime on the CPU, tiled along z when a volume is large.

Tiles are windows of whole (y, x) planes with an overlap; each keeps its central slices, so the
stitched logits match a whole-volume run away from tile seams and memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg.spec import SPEC

Runner = Callable[[np.ndarray], np.ndarray]  # (1, 1, Z, Y, X) -> (1, C, Z, Y, X)


def z_tiles(depth: int, plane: int, tile_voxels: int, overlap: int, divisor: int) -> list[tuple[int, int, int, int]]:
    """Windows (start, stop, keep_start, keep_stop) along z covering ``depth`` slices of ``plane`` voxels."""
    if depth * plane <= tile_voxels:
        return [(0, depth, 0, depth)]
    size = max(divisor, (tile_voxels // plane) // divisor * divisor)
    size = max(size, overlap + divisor)
    if size >= depth:
        return [(0, depth, 0, depth)]
    step = size - overlap
    starts = [*list(range(0, depth - size, step)), depth - size]
    tiles: list[tuple[int, int, int, int]] = []
    for i, s in enumerate(starts):
        keep_start = 0 if i == 0 else s + overlap // 2
        keep_stop = depth if i == len(starts) - 1 else s + size - overlap // 2
        if i > 0:
            keep_start = max(keep_start, tiles[-1][3])
        tiles.append((s, s + size, keep_start, keep_stop))
    return tiles


def run_tiled(run: Runner, image: np.ndarray, tile_voxels: int = SPEC.tile_voxels) -> np.ndarray:
    """(C, Z, Y, X) logits of a padded (1, Z, Y, X) image, whole or in z tiles."""
    _, depth, h, w = image.shape
    tiles = z_tiles(depth, h * w, tile_voxels, SPEC.tile_overlap, SPEC.network.size_divisor)
    if len(tiles) == 1:
        return run(image[None])[0]
    out = np.empty((SPEC.num_classes, depth, h, w), np.float32)
    for start, stop, keep_start, keep_stop in tiles:
        logits = run(np.ascontiguousarray(image[None, :, start:stop]))[0]
        out[:, keep_start:keep_stop] = logits[:, keep_start - start : keep_stop - start]
    return out


class OnnxSegmenter:
    """ONNX Runtime session of the exported segmenter; call with a padded (1, Z, Y, X) image."""

    def __init__(self, model_path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(1, C, Z, Y, X) logits of one (1, 1, Z, Y, X) batch."""
        return self._session.run([self._output], {self._input: batch})[0]  # type: ignore[no-any-return]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return run_tiled(self.run, image)
