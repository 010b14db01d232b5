# mypy: disable-error-code="attr-defined,assignment"
# (DALI's type stubs do not declare its enums or operator results)
"""The preprocessing pipeline, defined once in DALI: HU window and resampling to the model grid.

The GPU flavor's DALI backend serializes it (``model_repository/ct_preprocess/1/dali.py``); the CPU
flavor, the training data and the in-process reference run the very same definition on the CPU.
"""

from __future__ import annotations

import threading

import numpy as np
import nvidia.dali as dali
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types

from medseg.ops.preprocess import CPU_THREADS, PAD_VALUE
from medseg_client.spec import SPEC

_CT, _SPACING = (t.name for t in SPEC.preprocess.inputs)


def ct_preprocess_graph(device: str = "gpu"):  # type: ignore[no-untyped-def]
    """The pipeline's graph: CT int16 (z, y, x) + spacing (mm) -> window(resample to model spacing),
    padded to the network's divisor, in CDHW; and the unpadded model grid.

    ``device="gpu"`` runs the resize and the arithmetic on the GPU (the production flavor).
    """
    ct = fn.external_source(name=_CT, layout="DHW", dtype=types.INT16, device="cpu")
    spacing = fn.external_source(name=_SPACING, dtype=types.FLOAT, device="cpu")
    model_spacing = types.Constant(np.asarray(SPEC.model_spacing, dtype=np.float32))
    size = fn.cast(ct.shape(), dtype=types.FLOAT) * spacing / model_spacing
    vol = fn.expand_dims(ct, axes=[0], new_axis_names="C")  # CDHW: the network's layout
    vol = vol.gpu() if device == "gpu" else vol
    vol = fn.resize(vol, size=size, interp_type=types.INTERP_LINEAR, antialias=False, dtype=types.FLOAT)
    grid = vol.shape()[1:]
    lo, hi = SPEC.hu_window
    vol = (dmath.clamp(vol, lo, hi) - lo) * (1.0 / (hi - lo))
    vol = fn.pad(vol, axes=(1, 2, 3), align=SPEC.network.size_divisor, fill_value=PAD_VALUE)
    return vol, fn.cast(grid, dtype=types.INT64)


ct_preprocess = dali.pipeline_def(ct_preprocess_graph)


class CpuPreprocessor:
    """Runs :func:`ct_preprocess` on the CPU one study at a time (thread-safe)."""

    def __init__(self, num_threads: int = CPU_THREADS) -> None:
        self._pipe = ct_preprocess(
            device="cpu",
            batch_size=SPEC.max_batch_size,
            num_threads=num_threads,
            device_id=None,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        self._pipe.build()
        self._lock = threading.Lock()

    def __call__(self, ct: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(1, Z, Y, X) float32 network input and the unpadded model grid of one study."""
        with self._lock:
            image, grid = self._pipe.run(
                **{_CT: [np.ascontiguousarray(ct, dtype=np.int16)],
                   _SPACING: [np.asarray(spacing, dtype=np.float32).reshape(3)]}
            )
        g = np.asarray(grid[0]).reshape(3)
        return np.asarray(image[0]), (int(g[0]), int(g[1]), int(g[2]))
