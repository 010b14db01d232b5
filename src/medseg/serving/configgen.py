"""Generate every model configuration in ``model_repository/`` from the spec.

    python -m medseg.serving.configgen          # write the configs
    python -m medseg.serving.configgen --check  # exit 1 and show a diff if a committed config differs

Flavors follow Triton's ``--model-config-name``: ``config.pbtxt`` is GPU production (DALI backend ->
TensorRT plan -> python postprocess on the GPU); ``configs/cpu.pbtxt`` is the embedded default (the same
DALI pipeline in the python backend -> ONNX Runtime -> the same postprocess); ``configs/cuda.pbtxt`` is
for GPU hosts without NVIDIA's container (every step in PyTorch on the GPU, tensors passed by DLPack).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

from medseg.ops.preprocess import CPU_THREADS, GPU_THREADS
from medseg.paths import MODEL_REPOSITORY, ONNX_FILE
from medseg_client.card import CARD_FILE, CARD_PARAMETER, ROLES, ModelCard, spec_card
from medseg_client.spec import SPEC, ModelIO, Tensor

HEADER = "# Generated from medseg_client.spec by `python -m medseg.serving.configgen`; do not edit by hand.\n"


class Enum(str):
    """A protobuf enum value: written without quotes."""


def _value(v: Any, indent: int) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, dict):
        return "{\n" + _fields(v, indent + 2) + " " * indent + "}"
    raise TypeError(f"cannot write {type(v).__name__} to pbtxt")


def _fields(d: dict[str, Any], indent: int) -> str:
    out = []
    pad = " " * indent
    for key, v in d.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            items = ",\n".join(pad + "  " + _value(item, indent + 2) for item in v)
            out.append(f"{pad}{key} [\n{items}\n{pad}]\n")
        elif isinstance(v, list):
            out.append(f"{pad}{key}: [ {', '.join(_value(x, indent) for x in v)} ]\n")
        elif isinstance(v, dict):
            out.append(f"{pad}{key} {_value(v, indent)}\n")
        else:
            out.append(f"{pad}{key}: {_value(v, indent)}\n")
    return "".join(out)


def to_pbtxt(config: dict[str, Any], header: str = HEADER) -> str:
    """Text-format protobuf of a model configuration given as nested dicts and lists, checked against Triton's own
    schema (``model_config.proto`` as tritonclient ships it): a misspelled field or a wrong type raises ValueError."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = header + _fields(config, 0)
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"config of {config.get('name', '?')!r} is not a Triton ModelConfig: {e}") from None
    return text


def _tensors(tensors: tuple[Tensor, ...]) -> list[dict[str, Any]]:
    return [{"name": t.name, "data_type": Enum("TYPE_" + t.dtype), "dims": list(t.dims)} for t in tensors]


def _base(model: ModelIO) -> dict[str, Any]:
    return {
        "name": model.name,
        "max_batch_size": SPEC.max_batch_size,
        "input": _tensors(model.inputs),
        "output": _tensors(model.outputs),
    }


def _pinned(model: ModelIO) -> dict[str, Any]:
    return {"version_policy": {"specific": {"versions": [model.version]}}}


def _params(**kv: str) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": v}} for k, v in kv.items()]


def ensemble_config(ensemble: ModelIO = SPEC.ensemble, steps: tuple[ModelIO, ...] = (SPEC.preprocess, SPEC.segmenter,
                    SPEC.postprocess), card: str | None = None) -> dict[str, Any]:
    """An ensemble: preprocess -> segmenter -> postprocess, each step given the tensors it names (the raw CT and the
    spacing reach postprocess too); the model's card (JSON) rides along as a parameter for clients to read."""
    def step(model: ModelIO) -> dict[str, Any]:
        return {
            "model_name": model.name,
            "model_version": model.version,
            "input_map": [{"key": t.name, "value": t.name} for t in model.inputs],
            "output_map": [{"key": t.name, "value": t.name} for t in model.outputs],
        }

    return {
        **_base(ensemble),
        "platform": "ensemble",
        "ensemble_scheduling": {"step": [step(m) for m in steps]},
        **({"parameters": _params(**{CARD_PARAMETER: card})} if card is not None else {}),
    }


def _instances(kind: str, count: int = 1) -> dict[str, Any]:
    return {"instance_group": [{"kind": Enum(kind), "count": count}]}


def _python_on_gpu(model: ModelIO, kind: str, **params: str) -> dict[str, Any]:
    """A python-backend model whose tensors may stay on the GPU (DLPack in and out)."""
    return {**_base(model), "backend": "python", **_pinned(model), **_instances(kind),
            "parameters": _params(**params, FORCE_CPU_ONLY_INPUT_TENSORS="no")}


def cuda_flavor(kind: str = "KIND_GPU") -> dict[str, dict[str, Any]]:
    """The cuda flavor: every step in PyTorch on the instance's GPU.

    ``kind`` is KIND_GPU in the repository; a test writes the same configs with KIND_CPU to run the
    flavor's code through the real server on a machine without a GPU.
    """
    pre, seg, post = SPEC.preprocess, SPEC.segmenter, SPEC.postprocess
    return {
        f"{pre.name}/configs/cuda.pbtxt": _python_on_gpu(pre, kind, engine="torch"),
        f"{seg.name}/configs/cuda.pbtxt": _python_on_gpu(seg, kind, engine="torch", precision="fp16"),
        f"{post.name}/configs/cuda.pbtxt": _python_on_gpu(post, kind, engine="torch"),
    }


def config_dicts() -> dict[str, dict[str, Any]]:
    """Every model configuration as nested dicts, by path relative to the repository."""
    pre, seg, post = SPEC.preprocess, SPEC.segmenter, SPEC.postprocess
    return {
        f"{SPEC.ensemble.name}/config.pbtxt": ensemble_config(card=spec_card().to_json(compact=True)),
        # GPU production flavor: DALI on the GPU -> TensorRT -> postprocess on the GPU
        f"{pre.name}/config.pbtxt": {**_base(pre), "backend": "dali", **_pinned(pre), **_instances("KIND_GPU"),
                                     "parameters": _params(num_threads=str(GPU_THREADS))},
        f"{seg.name}/config.pbtxt": {**_base(seg), "platform": "tensorrt_plan", **_pinned(seg),
                                     **_instances("KIND_GPU")},
        f"{post.name}/config.pbtxt": _python_on_gpu(post, "KIND_GPU", engine="torch"),
        # CPU flavor: the same pipeline definition, ONNX Runtime, the same postprocess
        f"{pre.name}/configs/cpu.pbtxt": {**_base(pre), "backend": "python", **_pinned(pre), **_instances("KIND_CPU"),
                                          "parameters": _params(engine="dali", num_threads=str(CPU_THREADS))},
        f"{seg.name}/configs/cpu.pbtxt": {**_base(seg), "backend": "python", **_pinned(seg), **_instances("KIND_CPU"),
                                          "parameters": _params(engine="onnxruntime", onnx_file=ONNX_FILE,
                                                                intra_op_threads="0")},
        f"{post.name}/configs/cpu.pbtxt": {**_base(post), "backend": "python", **_pinned(post),
                                           **_instances("KIND_CPU"), "parameters": _params(engine="numpy")},
        **cuda_flavor(),
    }


CARD_HEADER = ("# Generated from {name}/card.json by `medseg import`; do not edit by hand. Imported models' steps run on\n"
               "# the CPU in every flavor (numpy, ONNX Runtime): their GPU path is not built yet.\n")


PLAN_FILE = "model.plan"  # an imported model's TensorRT engine, beside its ONNX in the segmenter's version folder


def card_config_dicts(card: ModelCard) -> dict[str, dict[str, Any]]:
    """An imported model's ensemble and its python-backend steps, by path relative to the repository. Preprocessing
    and postprocessing run in numpy on the CPU in every flavor; the sliding window's network runs in ONNX Runtime on
    the CPU (cpu flavor), as TorchScript on the GPU (cuda flavor) or as the TensorRT engine built for the card's tile
    (GPU production: ``python -m export.build_trt --card <repository>/<name>`` writes it beside the ONNX)."""
    pre, seg, post = (card.model_io(role) for role in ROLES)

    def python(model: ModelIO, role: str, kind: str = "KIND_CPU", **params: str) -> dict[str, Any]:
        return {**_base(model), "backend": "python", **_pinned(model), **_instances(kind),
                "parameters": _params(role=role, card=card.name, **params)}

    cpu_steps = {pre.name: python(pre, "preprocess", engine="numpy"),
                 seg.name: python(seg, "segmenter", engine="onnxruntime", onnx_file=card.onnx_file,
                                  intra_op_threads="0"),
                 post.name: python(post, "postprocess", engine="numpy")}
    cuda_steps = {**cpu_steps, seg.name: python(seg, "segmenter", "KIND_GPU", engine="torchscript",
                                                torchscript_file=card.torchscript_file)}
    production = {**cpu_steps, seg.name: python(seg, "segmenter", "KIND_GPU", engine="tensorrt", plan_file=PLAN_FILE)}
    return {
        f"{card.name}/config.pbtxt": ensemble_config(card.model_io("ensemble"), (pre, seg, post), card.to_json(compact=True)),
        **{f"{name}/configs/cpu.pbtxt": config for name, config in cpu_steps.items()},
        **{f"{name}/configs/cuda.pbtxt": config for name, config in cuda_steps.items()},
        **{f"{name}/config.pbtxt": config for name, config in production.items()},
    }


PYTHON_MODEL = '''"""{name}: a step of the imported model {card} (see its card.json). The class is the repository's one
python-backend model (``medseg.serving.python_model``); the config's ``role`` and ``card`` pick the step."""

from medseg.serving.python_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
'''


def write_card_model(card: ModelCard, repository: Path, onnx: Path, torchscript: Path) -> list[Path]:
    """Put an imported model into ``repository``: its card, the ensemble and step configs, each step's
    ``1/model.py``, the segmenter's ONNX and TorchScript files. Existing folders of the same names are replaced."""
    import shutil

    names = [card.name, *(card.model_io(role).name for role in ROLES)]
    for name in names:
        shutil.rmtree(repository / name, ignore_errors=True)
        (repository / name / "1").mkdir(parents=True)
    written = []
    for rel, config in card_config_dicts(card).items():
        path = repository / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_pbtxt(config, CARD_HEADER.format(name=card.name)))
        written.append(path)
    (repository / card.name / CARD_FILE).write_text(card.to_json())
    for name in names[1:]:
        (repository / name / "1" / "model.py").write_text(PYTHON_MODEL.format(name=name, card=card.name))
    seg_dir = repository / card.model_io("segmenter").name / "1"
    shutil.copy2(onnx, seg_dir / card.onnx_file)
    shutil.copy2(torchscript, seg_dir / card.torchscript_file)
    return [*written, repository / card.name / CARD_FILE, seg_dir / card.onnx_file, seg_dir / card.torchscript_file]


def configs() -> dict[Path, str]:
    """Every configuration file of the repository, path -> text."""
    return {MODEL_REPOSITORY / rel: to_pbtxt(cfg) for rel, cfg in config_dicts().items()}


def repository_variant(dest: Path, configs: dict[str, dict[str, Any]]) -> Path:
    """A copy of the model repository at ``dest`` with ``configs`` (path relative to it -> config) written
    over the generated ones: for a test or a benchmark that serves, say, other instance counts."""
    import shutil

    shutil.copytree(MODEL_REPOSITORY, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, config in configs.items():
        (dest / rel).write_text(to_pbtxt(config))
    return dest


def check(repo_files: dict[Path, str]) -> list[str]:
    """Unified diffs of every config whose committed text differs from the generated one."""
    diffs = []
    for path, text in repo_files.items():
        current = path.read_text() if path.exists() else ""
        if current != text:
            rel = path.relative_to(MODEL_REPOSITORY.parent) if path.is_relative_to(MODEL_REPOSITORY.parent) else path
            diffs.append("".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                      f"{rel} (committed)", f"{rel} (from spec)")))
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate model_repository configs from medseg_client.spec")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if a config differs")
    args = ap.parse_args(argv)
    files = configs()
    if args.check:
        diffs = check(files)
        for d in diffs:
            sys.stdout.write(d)
        if diffs:
            print(f"{len(diffs)} config(s) differ from the spec; run `python -m medseg.serving.configgen`", file=sys.stderr)
        return 1 if diffs else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(MODEL_REPOSITORY.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
