"""Shared glue for the python-backend models: unpack a request, call pure code, pack the response.

``pb_utils`` (``triton_python_backend_utils``) exists only inside Triton's stub, so it is passed in.
A refused study becomes INVALID_ARG with its reason; anything else INTERNAL with the error's type.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from medseg.errors import StudyError
from medseg.spec import SPEC, ModelIO

Handler = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model's config as plain strings."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def unbatch(tensor: np.ndarray, name: str) -> np.ndarray:
    """Drop the batch dimension (the spec's max_batch_size is 1)."""
    if tensor.ndim == 0 or tensor.shape[0] != SPEC.max_batch_size:
        raise StudyError(f"{name}: expected a batch of {SPEC.max_batch_size}, got shape {tensor.shape}")
    return tensor[0]


def execute(requests: list[Any], pb_utils: Any, model: ModelIO, handler: Handler) -> list[Any]:
    """Run ``handler`` on each request's unbatched inputs; one response per request, errors included."""
    responses = []
    for request in requests:
        try:
            inputs = {}
            for spec in model.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                if tensor is None:
                    raise StudyError(f"missing input {spec.name}")
                inputs[spec.name] = unbatch(tensor.as_numpy(), spec.name)
            outputs = handler(inputs)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(spec.name, np.ascontiguousarray(outputs[spec.name])[None]) for spec in model.outputs
            ]))
        except StudyError as e:
            responses.append(pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{model.name}: {e}", pb_utils.TritonError.INVALID_ARG)))
        except Exception as e:  # a bug or an exhausted resource: report it, keep the model alive
            responses.append(pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{model.name}: internal error {type(e).__name__}: {e}",
                                           pb_utils.TritonError.INTERNAL)))
    return responses


def json_tensor(obj: Any) -> np.ndarray:
    """A JSON document as a one-element bytes tensor (Triton STRING)."""
    return np.array([json.dumps(obj, sort_keys=False).encode("utf-8")], dtype=np.object_)
