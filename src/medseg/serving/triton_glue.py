"""Shared glue for the python-backend models: unpack a request, call pure code, pack the response.

``pb_utils`` (``triton_python_backend_utils``) exists only inside Triton's stub, so it is passed in.
A refused study becomes INVALID_ARG with its reason; anything else INTERNAL with the error's type.
Tensors cross as numpy arrays in host memory (``NumpyTensors``) or, in the GPU flavors, as torch
tensors through DLPack wherever they live (``TorchTensors``), so GPU data stays on the GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from medseg_client.errors import StudyError
from medseg_client.spec import SPEC, ModelIO

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class NumpyTensors:
    """Inputs as numpy arrays in host memory; outputs from numpy arrays."""

    def begin(self) -> None:
        """Called before each batch of requests (nothing to do for host arrays)."""

    def unpack(self, tensor: Any) -> Any:
        return tensor.as_numpy()

    def pack(self, pb_utils: Any, name: str, value: Any) -> Any:
        return pb_utils.Tensor(name, np.ascontiguousarray(value)[None])


class TorchTensors(NumpyTensors):
    """Inputs as torch tensors through DLPack, on the device they arrived on (no copy); torch outputs leave
    the same way (a GPU tensor stays on the GPU), numpy outputs (strings, host results) as numpy.

    The stub copies a GPU output after ``execute`` returns, asynchronously: were the tensor freed, torch's
    allocator would hand its memory to the next request while the copy still reads it (seen on an H200 at
    7 requests in flight: one study's GRID arrived holding another's SPACING). So the outputs of a batch
    are held until the next batch begins, and the device is synchronized before they are let go.
    """

    def __init__(self) -> None:
        self._held: list[Any] = []

    def begin(self) -> None:
        if self._held:
            import torch

            for device in {t.device for t in self._held}:  # an instance's GPU need not be the current one
                torch.cuda.synchronize(device)
            self._held.clear()

    def unpack(self, tensor: Any) -> Any:
        import torch.utils.dlpack

        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())

    def pack(self, pb_utils: Any, name: str, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return super().pack(pb_utils, name, value)
        import torch.utils.dlpack

        out = value[None].contiguous()
        if out.device.type == "cuda":
            self._held.append(out)
        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(out))


NUMPY = NumpyTensors()


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model's config as plain strings."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def instance_device(args: dict[str, Any]) -> str:
    """The torch device of a model instance: ``cuda:<id>`` for a KIND_GPU instance, ``cpu`` otherwise."""
    return f"cuda:{int(args['model_instance_device_id'])}" if args.get("model_instance_kind") == "GPU" else "cpu"


def unbatch(tensor: Any, name: str) -> Any:
    """Drop the batch dimension (the spec's max_batch_size is 1) of an array or tensor."""
    if tensor.ndim == 0 or tensor.shape[0] != SPEC.max_batch_size:
        raise StudyError(f"{name}: expected a batch of {SPEC.max_batch_size}, got shape {tuple(tensor.shape)}")
    return tensor[0]


def execute(requests: list[Any], pb_utils: Any, model: ModelIO, handler: Handler,
            tensors: NumpyTensors = NUMPY) -> list[Any]:
    """Run ``handler`` on each request's unbatched inputs; one response per request, errors included."""
    tensors.begin()
    responses = []
    for request in requests:
        if request.is_cancelled():  # the client gave up on this study: no work for it
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"{model.name}: the request was cancelled", pb_utils.TritonError.CANCELLED)))
            continue
        try:
            inputs = {}
            for spec in model.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                if tensor is None:
                    raise StudyError(f"missing input {spec.name}")
                inputs[spec.name] = unbatch(tensors.unpack(tensor), spec.name)
            outputs = handler(inputs)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                tensors.pack(pb_utils, spec.name, outputs[spec.name]) for spec in model.outputs
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
