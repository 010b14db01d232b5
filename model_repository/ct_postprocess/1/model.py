"""ct_postprocess: labels back on the study's grid, liver and tumor components, findings (JSON)."""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from medseg.postprocess import postprocess
from medseg.provenance import read_provenance
from medseg.spec import SPEC
from medseg.triton_glue import execute, json_tensor


class TritonPythonModel:
    def initialize(self, args):
        self.provenance = read_provenance(Path(args["model_repository"]).parent)

    def execute(self, requests):
        return execute(requests, pb_utils, SPEC.postprocess, self.run)

    def run(self, t):
        labels, findings = postprocess(t["LOGITS"], t["GRID"], t["CT"], t["SPACING"])
        return {"LABELS": labels, "FINDINGS": json_tensor({"model": self.provenance, **findings})}
