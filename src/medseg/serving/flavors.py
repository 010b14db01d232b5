"""What each python-backend model runs, chosen by its generated config: the ``engine`` parameter picks
the implementation, the instance group the device (KIND_GPU -> ``cuda:<id>``). Each ``model.py`` only
calls one of these and hands the result to ``triton_glue.execute``; tests call them without Triton.

    ct_preprocess   dali (CPU DALI, cpu flavor)        | torch (cuda flavor)
    ct_segmenter    onnxruntime (cpu flavor)           | torch (cuda flavor; FP16 autocast on a GPU)
    ct_postprocess  numpy (cpu flavor)                 | torch (cuda flavor and GPU production)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.model.provenance import read_provenance
from medseg.serving.triton_glue import NUMPY, Handler, NumpyTensors, TorchTensors, instance_device, json_tensor, model_parameters
from medseg_client.card import CARD_FILE, ROLES, ModelCard, read_card
from medseg_client.errors import ArtifactError, ServerError
from medseg_client.protocol import SERVER_TIMINGS_KEY
from medseg_client.spec import SPEC, ModelIO
from medseg_client.validate import check_study


@dataclass(frozen=True)
class Step:
    """A model's request handler and how its tensors cross the python backend."""

    handler: Handler
    tensors: NumpyTensors
    engine: str
    device: str


Builder = Callable[[dict[str, Any], dict[str, str], str], Step]
"""Makes a step from Triton's model args, the config's parameters and the instance's device."""


def _engine(args: dict[str, Any], model: str, builders: dict[str, Builder]) -> Step:
    """The step the config's ``engine`` parameter names, on the instance's device."""
    params = model_parameters(args)
    engine = params.get("engine", "")
    if engine not in builders:
        raise ArtifactError(f"{model}: parameter engine must be one of {sorted(builders)}, got {engine!r}")
    require_numpy_1()
    device = instance_device(args)
    if device.startswith("cuda"):
        require_cuda(device)
    return builders[engine](args, params, device)


def require_numpy_1() -> None:
    """Refuse to load a model under numpy 2: the python backend's stub reads arrays in numpy 1's layout,
    so every output made from numpy would reach the client empty (seen on a GPU host with numpy 2.5)."""
    if int(np.__version__.split(".")[0]) >= 2:
        raise ServerError(f"numpy {np.__version__} in the model's Python: the python backend stub needs numpy<2 "
                          "(numpy 2 outputs arrive empty); install numpy<2 where the server runs")


def require_cuda(device: str = "cuda:0") -> None:
    """Refuse a GPU flavor where torch sees no CUDA device (or not this one)."""
    import torch

    index = int(device.partition(":")[2] or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ServerError(f"{device} requested but torch {torch.__version__} sees "
                            f"{torch.cuda.device_count()} CUDA device(s): the cuda flavor needs an NVIDIA GPU and "
                            "a CUDA build of PyTorch")


def cuda_memory_pool_args(byte_size: int = 1 << 30) -> list[str]:
    """tritonserver flags for a CUDA memory pool on every visible GPU: the cuda flavor's steps pass GPU
    tensors to each other through it (none where there is no GPU)."""
    import torch

    return [f"--cuda-memory-pool-byte-size={i}:{byte_size}" for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------- ct_preprocess


def _dali_preprocess(args: dict[str, Any], params: dict[str, str], device: str) -> Step:
    from medseg.ops.dali_pipeline import CpuPreprocessor

    pipeline = CpuPreprocessor(num_threads=int(params["num_threads"]))  # configgen writes it

    def run(t: dict[str, Any]) -> dict[str, Any]:
        ct, spacing = t["CT"], t["SPACING"]
        check_study(ct.shape, ct.dtype, spacing)
        image, grid = pipeline(ct, spacing)
        return {"IMAGE": image, "GRID": np.asarray(grid, np.int64)}

    return Step(run, NUMPY, "dali", "cpu")


def _torch_preprocess(args: dict[str, Any], params: dict[str, str], device: str) -> Step:
    import torch

    from medseg.ops import torch_ops

    def run(t: dict[str, Any]) -> dict[str, Any]:
        ct, spacing = t["CT"], t["SPACING"].cpu().numpy()
        check_study(tuple(ct.shape), str(ct.dtype).removeprefix("torch."), spacing)  # before any copy to the GPU
        image, grid = torch_ops.preprocess(ct.to(device), [float(s) for s in spacing])
        # GRID goes on the device too: a host (numpy) output of a GPU instance bound for a GPU consumer
        # reached ct_postprocess empty ("input byte size mismatch ... Expected 24, got 0") on an H200
        return {"IMAGE": image, "GRID": torch.as_tensor(grid, dtype=torch.int64, device=image.device)}

    return Step(run, TorchTensors(), "torch", device)


def preprocess_step(args: dict[str, Any]) -> Step:
    """ct_preprocess: validate the study, then window + resample it onto the padded model grid."""
    return _engine(args, SPEC.preprocess.name, {"dali": _dali_preprocess, "torch": _torch_preprocess})


# ---------------------------------------------------------------- ct_segmenter


def _onnxruntime_segmenter(args: dict[str, Any], params: dict[str, str], device: str) -> Step:
    from medseg.model.inference import OnnxSegmenter

    version_dir = Path(args["model_repository"]) / args["model_version"]
    segmenter = OnnxSegmenter(version_dir / params["onnx_file"], threads=int(params.get("intra_op_threads", "0")))
    return Step(lambda t: _named_outputs(segmenter(t["IMAGE"])), NUMPY, "onnxruntime", "cpu")


def _torch_segmenter(args: dict[str, Any], params: dict[str, str], device: str) -> Step:
    from medseg.model.inference import TorchSegmenter

    segmenter = TorchSegmenter(device, params.get("precision", "fp16"), params.get("memory_format", "contiguous"),
                               params.get("compile", "no"))
    return Step(lambda t: _named_outputs(segmenter(t["IMAGE"].to(device))), TorchTensors(), "torch", device)


def _named_outputs(outputs: tuple[Any, ...]) -> dict[str, Any]:
    """The segmenter's outputs by the spec's names (the network's head gives them in that order)."""
    names = [o.name for o in SPEC.segmenter.outputs]
    if len(outputs) != len(names):
        raise ArtifactError(f"{SPEC.segmenter.name}: the network gives {len(outputs)} outputs, the spec names "
                            f"{len(names)} ({', '.join(names)}): export the model again (make artifacts)")
    return dict(zip(names, outputs, strict=True))


def segmenter_step(args: dict[str, Any]) -> Step:
    """ct_segmenter: the padded image's labels and probabilities (the network's head), in z tiles when large."""
    return _engine(args, SPEC.segmenter.name, {"onnxruntime": _onnxruntime_segmenter, "torch": _torch_segmenter})


# ---------------------------------------------------------------- ct_postprocess


def _stamped(doc: dict[str, Any], provenance: dict[str, Any], t0: float) -> dict[str, Any]:
    """The findings with the model's provenance and this request's own postprocess time."""
    return {"model": provenance, **doc, SERVER_TIMINGS_KEY: {"postprocess_s": round(time.perf_counter() - t0, 3)}}


def _numpy_postprocess(args: dict[str, Any], params: dict[str, str], device: str) -> Step:
    from medseg.ops.postprocess import postprocess

    provenance = read_provenance(Path(args["model_repository"]).parent)

    def run(t: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        labels, doc = postprocess(t["MODEL_LABELS"], t["PROBABILITIES"], t["GRID"], t["CT"], t["SPACING"])
        return {"LABELS": labels, "FINDINGS": json_tensor(_stamped(doc, provenance, t0))}

    return Step(run, NUMPY, "numpy", device)


def _torch_postprocess(args: dict[str, Any], params: dict[str, str], device: str) -> Step:
    from medseg.ops import torch_ops
    from medseg.ops.postprocess import findings

    provenance = read_provenance(Path(args["model_repository"]).parent)

    def run(t: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        grid, spacing = (t[k].cpu().numpy() for k in ("GRID", "SPACING"))
        ct = torch_ops.DeviceVolume(t["CT"])  # read in boxes where Triton put it (host or GPU), never copied whole
        # the segmenter's outputs and the way back to the study's grid on the device; the judging on the host
        labels, verdict = torch_ops.postprocess(t["MODEL_LABELS"].to(device), t["PROBABILITIES"].to(device), grid,
                                                ct, spacing)
        doc = findings(labels, grid, ct, spacing, verdict)
        return {"LABELS": labels, "FINDINGS": json_tensor(_stamped(doc, provenance, t0))}

    return Step(run, TorchTensors(), "torch", device)


def postprocess_step(args: dict[str, Any]) -> Step:
    """ct_postprocess: labels on the study's grid and the findings, stamped with the model's provenance."""
    return _engine(args, SPEC.postprocess.name, {"numpy": _numpy_postprocess, "torch": _torch_postprocess})


# ---------------------------------------------------------------- imported models (a card per model)


def card_step(args: dict[str, Any]) -> tuple[ModelIO, Step]:
    """A step of an imported model: the config's ``role`` says which, ``card`` names the model whose card.json
    (in the ensemble's folder) says how; the tensors come from the card too."""
    params = model_parameters(args)
    role, name = params.get("role", ""), params.get("card", "")
    if role not in ROLES or not name:
        raise ArtifactError(f"{args['model_name']}: parameters role (one of {', '.join(ROLES)}) and card must be set, "
                            f"got role={role!r} card={name!r}")
    require_numpy_1()
    card = read_card(Path(args["model_repository"]).parent / name / CARD_FILE)
    builders = {"preprocess": _card_preprocess, "segmenter": _card_segmenter, "postprocess": _card_postprocess}
    device = instance_device(args)
    if device.startswith("cuda"):
        require_cuda(device)
    return card.model_io(role), builders[role](card, args, params, device)


def card_ops(card: ModelCard) -> Any:
    """The module restating the card's pipeline (nnU-Net's or MONAI's): ``preprocess``, ``logits``,
    ``labels_on_study``."""
    from medseg.ops import monai, nnunet

    pipelines = {"nnunet": nnunet, "monai": monai}
    if card.pipeline not in pipelines:
        raise ArtifactError(f"{card.name}: card pipeline must be one of {', '.join(pipelines)}, got {card.pipeline!r}")
    return pipelines[card.pipeline]


def _card_preprocess(card: ModelCard, args: dict[str, Any], params: dict[str, str], device: str) -> Step:
    ops = card_ops(card)

    def run(t: dict[str, Any]) -> dict[str, Any]:
        ct, spacing = t["CT"], t["SPACING"]
        check_study(ct.shape, ct.dtype, spacing)
        image, geometry = ops.preprocess(ct, spacing, card)
        return {"IMAGE": image, "GEOMETRY": geometry}

    return Step(run, NUMPY, "numpy", device)


def _card_segmenter(card: ModelCard, args: dict[str, Any], params: dict[str, str], device: str) -> Step:
    """The card's sliding window; the tiles through ONNX Runtime on the CPU (cpu flavor), the TorchScript network in
    float32 on the instance's device (cuda flavor) or the TensorRT engine built for the card's tile (GPU production)."""
    from medseg.model.inference import OnnxSegmenter, TensorRTTiles, TorchScriptTiles

    ops = card_ops(card)
    version_dir = Path(args["model_repository"]) / args["model_version"]
    engine = params.get("engine", "onnxruntime")
    predict: Callable[[np.ndarray], np.ndarray]
    if engine == "onnxruntime":
        predict = OnnxSegmenter(version_dir / params.get("onnx_file", card.onnx_file),
                                threads=int(params.get("intra_op_threads", "0"))).run
    elif engine == "torchscript":
        path = version_dir / params.get("torchscript_file", card.torchscript_file)
        if not path.is_file():
            raise ArtifactError(f"{path}: no TorchScript network (import the model again with this medseg version)")
        predict = TorchScriptTiles(path, device).run
    elif engine == "tensorrt":
        predict = TensorRTTiles(version_dir / params.get("plan_file", "model.plan"), device).run
    else:
        raise ArtifactError(f"{args['model_name']}: parameter engine must be onnxruntime, torchscript or tensorrt, "
                            f"got {engine!r}")
    return Step(lambda t: {"LOGITS": ops.logits(t["IMAGE"], card, predict)}, NUMPY, engine, device)


def _card_postprocess(card: ModelCard, args: dict[str, Any], params: dict[str, str], device: str) -> Step:
    from medseg.ops.postprocess import label_findings

    ops = card_ops(card)
    model = {"ensemble": card.name, "version": card.version, "source": card.source}

    def run(t: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        labels = ops.labels_on_study(t["LOGITS"], t["GEOMETRY"], t["SPACING"], card)
        doc = label_findings(labels, t["CT"], t["SPACING"], card.labels)
        return {"LABELS": labels, "FINDINGS": json_tensor(_stamped(doc, model, t0))}

    return Step(run, NUMPY, "numpy", device)
