"""ct_preprocess in the python backend: the DALI pipeline of ``dali.py`` on the CPU (cpu flavor) or its
PyTorch twin on the GPU (cuda flavor), as the config's ``engine`` says; see ``medseg.flavors``."""

import triton_python_backend_utils as pb_utils

from medseg.flavors import preprocess_step
from medseg.spec import SPEC
from medseg.triton_glue import execute


class TritonPythonModel:
    def initialize(self, args):
        self.step = preprocess_step(args)

    def execute(self, requests):
        return execute(requests, pb_utils, SPEC.preprocess, self.step.handler, self.step.tensors)
