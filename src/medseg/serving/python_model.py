"""The one python-backend model of the repository. Each python model's ``1/model.py`` re-exports this class. For the
shipped liver model the model's name (Triton's ``args["model_name"]``) picks its tensors and step; an imported
model's step is named by its config's ``role`` and ``card`` parameters (``flavors.card_step``). The ``engine``
parameter picks the implementation (``flavors``: DALI, numpy or ONNX Runtime on the CPU, PyTorch on the GPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medseg.serving import flavors
from medseg.serving.triton_glue import execute
from medseg_client.spec import SPEC, ModelIO

STEPS: dict[str, tuple[ModelIO, Callable[[dict[str, Any]], flavors.Step]]] = {
    SPEC.preprocess.name: (SPEC.preprocess, flavors.preprocess_step),
    SPEC.segmenter.name: (SPEC.segmenter, flavors.segmenter_step),
    SPEC.postprocess.name: (SPEC.postprocess, flavors.postprocess_step),
}


class TritonPythonModel:
    """Triton's python-backend interface: ``initialize`` builds the step once per instance, ``execute`` runs it."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton's python stub

        self.pb_utils = pb_utils
        name = args["model_name"]
        if name in STEPS:
            self.model, build = STEPS[name]
            self.step = build(args)
        else:
            self.model, self.step = flavors.card_step(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute(requests, self.pb_utils, self.model, self.step.handler, self.step.tensors)
