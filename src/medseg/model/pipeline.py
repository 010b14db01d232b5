"""The in-process reference pipeline: the served steps run in this process with the same artifacts.

Tests compare the served ensemble with it; benchmarks use it as the no-server baseline.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medseg.ops.postprocess import postprocess
from medseg.ops.preprocess import preprocess_reference
from medseg.paths import MODEL_REPOSITORY, onnx_model
from medseg_client.validate import check_study


def dali_installed() -> bool:
    """Whether NVIDIA DALI can be imported here (the cpu flavor's preprocessing needs it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:  # no ``nvidia`` namespace at all
        return False


class ReferencePipeline:
    """DALI preprocessing (CPU) -> ONNX Runtime -> postprocess, without a server.

    ``preprocessing="numpy"`` swaps DALI for the numpy reference it is tested against (the default where
    DALI is not installed, e.g. a GPU test host carrying only PyTorch).
    """

    def __init__(self, model_repository: Path = MODEL_REPOSITORY, preprocessing: str | None = None) -> None:
        from medseg.model.inference import OnnxSegmenter

        self.preprocessing = preprocessing or ("dali" if dali_installed() else "numpy")
        if self.preprocessing == "dali":
            from medseg.ops.dali_pipeline import CpuPreprocessor

            self.preprocess: Callable[[np.ndarray, Any], tuple[np.ndarray, tuple[int, int, int]]] = CpuPreprocessor()
        elif self.preprocessing == "numpy":
            self.preprocess = preprocess_reference
        else:
            raise ValueError(f"preprocessing must be 'dali' or 'numpy', got {preprocessing!r}")
        onnx = onnx_model(model_repository)
        self.segmenter = OnnxSegmenter(onnx)

    def __call__(self, ct: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, dict[str, Any]]:
        check_study(ct.shape, ct.dtype, spacing)
        image, grid = self.preprocess(ct, np.asarray(spacing, np.float32))
        labels, probabilities = self.segmenter(image)
        return postprocess(labels, probabilities, grid, ct, spacing)
