"""The in-process reference pipeline: the served steps run in this process with the same artifacts.

Tests compare the served ensemble with it; benchmarks use it as the no-server baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.postprocess import postprocess
from medseg.spec import MODEL_REPOSITORY, SPEC
from medseg.validate import check_study


class ReferencePipeline:
    """DALI preprocessing (CPU) -> ONNX Runtime -> postprocess, without a server."""

    def __init__(self, model_repository: Path = MODEL_REPOSITORY) -> None:
        from medseg.dali_pipeline import CpuPreprocessor
        from medseg.inference import OnnxSegmenter

        self.preprocess = CpuPreprocessor()
        onnx = model_repository / SPEC.segmenter.name / str(SPEC.segmenter.version) / "model.onnx"
        self.segmenter = OnnxSegmenter(onnx)

    def __call__(self, ct: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, dict[str, Any]]:
        check_study(ct.shape, ct.dtype, spacing)
        image, grid = self.preprocess(ct, np.asarray(spacing, np.float32))
        logits = self.segmenter(image)
        return postprocess(logits, grid, ct, spacing)
