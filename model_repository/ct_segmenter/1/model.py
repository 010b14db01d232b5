"""CPU flavor of ct_segmenter: the exported ONNX model on ONNX Runtime, tiled along z for large grids."""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from medseg.inference import OnnxSegmenter
from medseg.spec import SPEC
from medseg.triton_glue import execute, model_parameters


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.segmenter = OnnxSegmenter(version_dir / params["onnx_file"], threads=int(params["intra_op_threads"]))

    def execute(self, requests):
        return execute(requests, pb_utils, SPEC.segmenter, lambda t: {"LOGITS": self.segmenter(t["IMAGE"])})
