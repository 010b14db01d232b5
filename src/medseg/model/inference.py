"""Running the segmenter: ONNX Runtime on the CPU, or PyTorch on any device; tiled along z when large.

Tiles are windows of whole (y, x) planes with an overlap; each keeps its central slices, so the
stitched logits match a whole-volume run away from tile seams and memory stays bounded. The tiling
works on numpy arrays and on torch tensors alike (a GPU flavor's tiles never leave the GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medseg_client.errors import ArtifactError
from medseg_client.spec import SPEC

Runner = Callable[[Any], Any]  # (1, 1, Z, Y, X) -> (1, C, Z, Y, X), numpy arrays or torch tensors


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


def run_tiled(run: Runner, image: Any, tile_voxels: int = SPEC.tile_voxels) -> Any:
    """(C, Z, Y, X) logits of a padded (1, Z, Y, X) image (numpy array or torch tensor), whole or in z tiles."""
    _, depth, h, w = image.shape
    tiles = z_tiles(depth, h * w, tile_voxels, SPEC.tile_overlap, SPEC.network.size_divisor)
    if len(tiles) == 1:
        return run(image[None])[0]
    shape = (SPEC.num_classes, depth, h, w)
    is_numpy = isinstance(image, np.ndarray)
    out = np.empty(shape, np.float32) if is_numpy else image.new_empty(shape)
    for start, stop, keep_start, keep_stop in tiles:
        tile = image[None, :, start:stop]
        logits = run(np.ascontiguousarray(tile) if is_numpy else tile.contiguous())[0]
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


class TorchScriptTiles:
    """An imported model's network traced by TorchScript, on ``device``: a batch of tiles (B, C, *patch) in numpy,
    their logits (B, K, *patch) back in numpy (float32 throughout, so the labels are the cpu flavor's)."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self._model = torch.jit.load(str(path), map_location=self.device).eval()

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self._model(torch.from_numpy(batch).to(self.device, non_blocking=True))
        return out.float().cpu().numpy()  # type: ignore[no-any-return]


class TensorRTTiles:
    """A serialized TensorRT engine of a tile network (input IMAGE, output LOGITS, a dynamic batch) on a GPU: a batch
    (B, C, *tile) in numpy, its logits (B, K, *tile) back in numpy; device buffers held by PyTorch."""

    def __init__(self, path: Path, num_classes: int, device: str = "cuda:0") -> None:
        import torch

        try:
            import tensorrt as trt
        except ImportError:
            raise ArtifactError(f"{path}: TensorRT is not installed here (the GPU production flavor runs in NVIDIA's "
                                "Triton container; elsewhere serve --flavor cuda)") from None
        if not path.is_file():
            raise ArtifactError(f"{path}: no TensorRT engine (build it with python -m export.build_trt, see docs/gpu.md)")
        self._engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise ArtifactError(f"{path}: TensorRT cannot load this engine (built by another TensorRT version or for "
                                "another GPU? rebuild it here)")
        self._context = self._engine.create_execution_context()
        self._classes = num_classes
        self.device = torch.device(device)

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
        y = torch.empty((x.shape[0], self._classes, *x.shape[2:]), dtype=torch.float32, device=self.device)
        self._context.set_input_shape("IMAGE", tuple(x.shape))
        self._context.set_tensor_address("IMAGE", int(x.data_ptr()))
        self._context.set_tensor_address("LOGITS", int(y.data_ptr()))
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError("TensorRT execution failed")
        stream.synchronize()
        return y.cpu().numpy()  # type: ignore[no-any-return]


class TorchSegmenter:
    """The shipped weights in PyTorch on ``device`` (FP16 autocast on a GPU); call with a padded (1, Z, Y, X) tensor."""

    def __init__(self, device: str = "cpu", precision: str = "fp16") -> None:
        import torch

        from medseg.model.network import load_network

        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
        self.device = torch.device(device)
        self._model = load_network().to(self.device)
        self._half = precision == "fp16" and self.device.type == "cuda"  # CPU convolutions stay in fp32
        if self.device.type == "cuda":  # the same study twice gives the same labels: no autotuned or atomic kernels
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

    def run(self, batch: Any) -> Any:
        """(1, C, Z, Y, X) float32 logits of one (1, 1, Z, Y, X) batch, on the device."""
        import torch

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self._half):
            return self._model(batch.to(self.device)).float()

    def __call__(self, image: Any) -> Any:
        return run_tiled(self.run, image)
