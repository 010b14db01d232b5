"""ct_segmenter in the python backend: the exported ONNX model on ONNX Runtime (cpu flavor) or the shipped weights
in PyTorch on the GPU (cuda flavor), tiled along z for large grids. The class is the repository's one python-backend
model (``medseg.serving.python_model``); the model's name picks the step."""

from medseg.serving.python_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
