"""ct_postprocess: labels back on the study's grid, the largest organ kept, findings (JSON); in numpy on the CPU
(cpu flavor) or in PyTorch on the GPU (cuda flavor, GPU production). The class is the repository's one python-backend
model (``medseg.serving.python_model``); the model's name picks the step."""

from medseg.serving.python_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
