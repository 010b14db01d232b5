"""ct_segmenter in the python backend: the exported ONNX model on ONNX Runtime (cpu flavor) or the shipped
weights in PyTorch on the GPU (cuda flavor), tiled along z for large grids; see ``medseg.flavors``."""

import triton_python_backend_utils as pb_utils

from medseg.flavors import segmenter_step
from medseg.spec import SPEC
from medseg.triton_glue import execute


class TritonPythonModel:
    def initialize(self, args):
        self.step = segmenter_step(args)

    def execute(self, requests):
        return execute(requests, pb_utils, SPEC.segmenter, self.step.handler, self.step.tensors)
