"""Where a source checkout keeps its artifacts: the model repository, the shipped weights, the ONNX model.

Only the server side and the offline tools use these; the client needs none of them.
"""

from __future__ import annotations

from pathlib import Path

from medseg_client.spec import SPEC

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
WEIGHTS_DIR = REPO_ROOT / "export" / "weights"


def onnx_model(repository: Path = MODEL_REPOSITORY) -> Path:
    """The segmenter's ONNX file in a model repository (what `make artifacts` writes, the cpu flavor loads)."""
    return repository / SPEC.segmenter.name / str(SPEC.segmenter.version) / ONNX_FILE


ONNX_FILE = "model.onnx"
ONNX_MODEL = onnx_model()
