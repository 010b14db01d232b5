"""ct_postprocess: labels back on the study's grid, the largest organ kept, findings (JSON); in numpy on the
CPU (cpu flavor) or in PyTorch on the GPU (cuda flavor, GPU production); see ``medseg.flavors``."""

import triton_python_backend_utils as pb_utils

from medseg.flavors import postprocess_step
from medseg.spec import SPEC
from medseg.triton_glue import execute


class TritonPythonModel:
    def initialize(self, args):
        self.step = postprocess_step(args)

    def execute(self, requests):
        return execute(requests, pb_utils, SPEC.postprocess, self.step.handler, self.step.tensors)
