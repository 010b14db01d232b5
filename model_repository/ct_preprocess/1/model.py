"""ct_preprocess in the python backend: the DALI pipeline of ``dali.py`` on the CPU (cpu flavor) or its PyTorch twin
on the GPU (cuda flavor), as the config's ``engine`` says. The class is the repository's one python-backend model
(``medseg.serving.python_model``); the model's name picks the step."""

from medseg.serving.python_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
