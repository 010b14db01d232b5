"""CPU flavor of ct_preprocess: the DALI pipeline of ``dali.py`` run on the CPU in the python backend."""

import numpy as np
import triton_python_backend_utils as pb_utils

from medseg.dali_pipeline import CpuPreprocessor
from medseg.spec import SPEC
from medseg.triton_glue import execute, model_parameters
from medseg.validate import check_study


class TritonPythonModel:
    def initialize(self, args):
        self.pipeline = CpuPreprocessor(num_threads=int(model_parameters(args).get("num_threads", "2")))

    def execute(self, requests):
        return execute(requests, pb_utils, SPEC.preprocess, self.run)

    def run(self, inputs):
        ct, spacing = inputs["CT"], inputs["SPACING"]
        check_study(ct.shape, ct.dtype, spacing)
        image, grid = self.pipeline(ct, spacing)
        return {"IMAGE": image, "GRID": np.asarray(grid, np.int64)}
