"""Running the segmenter: ONNX Runtime on the CPU, or PyTorch on any device; tiled along z when large.

Tiles are windows of whole (y, x) planes with an overlap; each keeps its central slices, so the
stitched outputs match a whole-volume run away from tile seams and memory stays bounded. The tiling
works on numpy arrays and on torch tensors alike (a GPU flavor's tiles never leave the GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medseg_client.errors import ArtifactError
from medseg_client.spec import SPEC

# (1, 1, Z, Y, X) -> the network's outputs, each (1, ..., Z, Y, X): numpy arrays or torch tensors
Runner = Callable[[Any], tuple[Any, ...]]


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


def run_tiled(run: Runner, image: Any, tile_voxels: int = SPEC.tile_voxels) -> tuple[Any, ...]:
    """The network's outputs without their batch axis (each (..., Z, Y, X), z third from the end) for a padded
    (1, Z, Y, X) image (numpy array or torch tensor), run whole or in z tiles stitched along z."""
    _, depth, h, w = image.shape
    tiles = z_tiles(depth, h * w, tile_voxels, SPEC.tile_overlap, SPEC.network.size_divisor)
    if len(tiles) == 1:
        return tuple(o[0] for o in run(image[None]))
    is_numpy = isinstance(image, np.ndarray)
    outs: list[Any] = []
    for start, stop, keep_start, keep_stop in tiles:
        tile = image[None, :, start:stop]
        for k, part in enumerate(run(np.ascontiguousarray(tile) if is_numpy else tile.contiguous())):
            part = part[0]
            if len(outs) == k:  # the first tile tells each output's channels and dtype
                shape = (*part.shape[:-3], depth, h, w)
                outs.append(np.empty(shape, part.dtype) if is_numpy else part.new_empty(shape))
            outs[k][..., keep_start:keep_stop, :, :] = part[..., keep_start - start : keep_stop - start, :, :]
    return tuple(outs)


class OnnxSegmenter:
    """ONNX Runtime session of an exported network: ``run`` gives a batch's first output (an imported model's
    logits); calling it with a padded (1, Z, Y, X) image gives every output (medseg's labels and probabilities)."""

    def __init__(self, model_path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The first output (e.g. (B, C, Z, Y, X) logits) of one (B, 1, Z, Y, X) batch."""
        return self._session.run(self.output_names[:1], {self._input: batch})[0]  # type: ignore[no-any-return]

    def run_all(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every output of one batch, in the graph's order."""
        return tuple(self._session.run(self.output_names, {self._input: batch}))

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, ...]:
        return run_tiled(self.run_all, image)


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
    """A serialized TensorRT engine (input IMAGE, a dynamic batch) on a GPU, device buffers held by PyTorch: ``run``
    gives a batch's first output (an imported tile network's (B, K, *tile) logits), ``run_all`` every output in the
    engine's order with the engine's dtypes (the shipped model's labels and probabilities), both in numpy."""

    def __init__(self, path: Path, device: str = "cuda:0") -> None:
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
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._input = next(n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.uint8: torch.uint8,
                  trt.int8: torch.int8, trt.int32: torch.int32, trt.bool: torch.bool}
        self._outputs = [(n, dtypes[self._engine.get_tensor_dtype(n)]) for n in names
                         if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.device = torch.device(device)

    def run_all(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
        self._context.set_input_shape(self._input, tuple(x.shape))
        self._context.set_tensor_address(self._input, int(x.data_ptr()))
        outputs = []
        for name, dtype in self._outputs:
            y = torch.empty(tuple(self._context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            self._context.set_tensor_address(name, int(y.data_ptr()))
            outputs.append(y)
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError("TensorRT execution failed")
        stream.synchronize()
        return tuple(y.cpu().numpy() for y in outputs)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_all(batch)[0]

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every output of a padded (1, Z, Y, X) image without its batch axis: one engine call (the engine's
        optimisation profile bounds the grid, no tiling)."""
        return tuple(o[0] for o in self.run_all(image[None]))


COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune")  # torch.compile's; reduce-overhead: CUDA graphs
MEMORY_FORMATS = ("contiguous", "channels_last")


class TorchSegmenter:
    """The shipped network with its head (``medseg.model.head``) in PyTorch on ``device`` (FP16 autocast on a GPU);
    call with a padded (1, Z, Y, X) tensor for (labels, probabilities) on the device. ``memory_format`` and
    ``compile`` (a ``torch.compile`` mode, dynamic shapes) are the cuda flavor's knobs: kept only where they measure
    faster on the GPU (``python -m perf.segmenter_variants``); the defaults are eager and contiguous."""

    def __init__(self, device: str = "cpu", precision: str = "fp16", memory_format: str = "contiguous",
                 compile: str = "no") -> None:
        import torch

        from medseg.model.head import load_segmenter

        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.device = torch.device(device)
        self._format = torch.channels_last_3d if memory_format == "channels_last" else torch.contiguous_format
        model = load_segmenter().to(self.device, memory_format=self._format)  # type: ignore[call-overload]
        self._model = model if compile == "no" else torch.compile(model, mode=compile, dynamic=True)
        self._half = precision == "fp16" and self.device.type == "cuda"  # CPU convolutions stay in fp32
        if self.device.type == "cuda":  # the same study twice gives the same labels: no autotuned or atomic kernels
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

    def run(self, batch: Any) -> tuple[Any, Any]:
        """(1, Z, Y, X) uint8 labels and (1, 2, Z, Y, X) float16 probabilities of one (1, 1, Z, Y, X) batch."""
        import torch

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self._half):
            labels, probabilities = self._model(batch.to(self.device, memory_format=self._format))
        return labels.contiguous(), probabilities.contiguous()

    def __call__(self, image: Any) -> tuple[Any, ...]:
        return run_tiled(self.run, image)
