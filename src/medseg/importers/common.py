"""What every importer shares: a valid model name, labels and their DICOM codes, the network's checked exports (ONNX,
TorchScript) and writing the model into a repository."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from medseg_client.card import ModelCard
from medseg_client.errors import ArtifactError
from medseg_client.spec import SPEC, Code, Label

NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
# distinct overlay colours for labels without their own (a card may set others)
PALETTE = ((60, 200, 90), (235, 60, 50), (70, 130, 230), (240, 200, 40), (180, 90, 220), (40, 200, 200),
           (240, 130, 40), (200, 80, 140), (120, 200, 60), (150, 150, 255))
RESERVED = {SPEC.ensemble.name, SPEC.preprocess.name, SPEC.segmenter.name, SPEC.postprocess.name}


def check_name(name: str, repository: Path) -> None:
    """Refuse a name Triton or the repository cannot take: lower-case letters, digits, underscores; not the
    shipped model's."""
    if not NAME.fullmatch(name):
        raise ArtifactError(f"--name {name!r}: expected lower-case letters, digits and underscores, starting with a letter")
    if name in RESERVED or any(name == r.rsplit("_", 1)[0] for r in RESERVED):
        raise ArtifactError(f"--name {name!r}: taken by the shipped liver model's models ({', '.join(sorted(RESERVED))})")
    if not repository.is_dir():
        raise ArtifactError(f"--model-repository {repository}: not a folder")


def plain_labels(values: list[tuple[int, str]]) -> tuple[Label, ...]:
    """Labels from (value, name) pairs, sorted, 0 first: a display name from the name, a colour from the palette,
    no DICOM codes (``--label-codes`` adds them)."""
    return tuple(Label(v, k, k.replace("_", " ").capitalize(), (0, 0, 0) if v == 0 else PALETTE[(v - 1) % len(PALETTE)])
                 for v, k in sorted(values))


def with_label_codes(card: ModelCard, path: Path) -> ModelCard:
    """The card with DICOM codes (and optionally display names and colours) for its labels from a JSON file:
    ``{"liver": {"category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
    "type": {...}, "region": {...}, "display": "Liver", "color": [r, g, b]}, ...}``."""
    try:
        given = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"--label-codes {path}: not a readable JSON file ({e})") from None
    unknown = sorted(set(given) - {lab.name for lab in card.labels})
    if unknown:
        raise ArtifactError(f"--label-codes {path}: no label named {', '.join(unknown)} in the model "
                            f"(its labels: {', '.join(lab.name for lab in card.labels[1:])})")
    labels = []
    for lab in card.labels:
        g = given.get(lab.name, {})
        try:
            codes = {k: Code(**g[k]) if g.get(k) else getattr(lab, k) for k in ("category", "type", "region")}
        except TypeError as e:
            raise ArtifactError(f"--label-codes {path}: {lab.name}: a code needs value, scheme and meaning ({e})") from None
        color = tuple(int(c) for c in g.get("color", lab.color))
        if len(color) != 3:
            raise ArtifactError(f"--label-codes {path}: {lab.name}: color must be [r, g, b], got {g['color']}")
        labels.append(Label(lab.value, lab.name, str(g.get("display", lab.display)), (color[0], color[1], color[2]),
                            codes["category"], codes["type"], codes["region"]))
    return replace(card, labels=tuple(labels))


def export_checked_onnx(model: Any, card: ModelCard, out: Path, what: str, opset: int = 17) -> float:
    """ONNX of ``model`` (a torch module: a batch of tiles -> their logits; the batch dynamic), run by ONNX Runtime
    on two random tiles and checked against PyTorch; the largest difference. Nothing is left behind on failure."""
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    x = torch.randn(2, card.in_channels, *card.inference.patch, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(), warnings.catch_warnings():
        # the TorchScript exporter's deprecation notes, and instance norm exported with its per-sample statistics
        # (what the frameworks' instance norms compute at inference too)
        warnings.simplefilter("ignore")
        ref = model(x).numpy()
        if ref.shape != (2, card.num_classes, *card.inference.patch):
            raise ArtifactError(f"{what}: the network gives {tuple(ref.shape)} for a batch of 2 tiles "
                                f"{card.inference.patch}, expected {(2, card.num_classes, *card.inference.patch)} "
                                f"({card.num_classes} labels)")
        torch.onnx.export(model, (x,), str(out), input_names=["IMAGE"], output_names=["LOGITS"], opset_version=opset,
                          dynamic_axes={"IMAGE": {0: "batch"}, "LOGITS": {0: "batch"}}, dynamo=False)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"IMAGE": x.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    if not diff <= 1e-3 * max(scale, 1.0):
        out.unlink()
        raise ArtifactError(f"ONNX export of {what} differs from PyTorch by {diff:.3g} (outputs up to {scale:.3g})")
    return diff


def export_checked_torchscript(model: Any, card: ModelCard, out: Path, what: str) -> float:
    """The network traced by TorchScript (what the GPU flavors run), checked against the module on a batch of 3 tiles
    (traced with 2: the batch stays free); the largest difference. Nothing is left behind on failure."""
    import warnings

    import torch

    gen = torch.Generator().manual_seed(1)
    x2, x3 = (torch.randn(n, card.in_channels, *card.inference.patch, generator=gen) for n in (2, 3))
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on python values it records as constants
        traced = torch.jit.trace(model, (x2,), check_trace=False)
        traced.save(str(out))
        ref = model(x3)
        got = torch.jit.load(str(out))(x3)
    diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
    scale = float(ref.abs().max())
    if not diff <= 1e-3 * max(scale, 1.0):
        out.unlink()
        raise ArtifactError(f"TorchScript trace of {what} differs from PyTorch by {diff:.3g} on a batch of 3 tiles "
                            f"(outputs up to {scale:.3g})")
    return diff


def write_model(network: Any, card: ModelCard, repository: Path, what: str, log: Any) -> list[Path]:
    """The network exported twice (ONNX for the cpu flavor, TorchScript for the GPU flavors), each checked against
    PyTorch, then the card, configs and files written into ``repository``; the files written."""
    import tempfile

    from medseg.serving.configgen import write_card_model

    with tempfile.TemporaryDirectory(prefix="medseg-import-") as tmp:
        onnx, script = Path(tmp) / card.onnx_file, Path(tmp) / card.torchscript_file
        d_onnx = export_checked_onnx(network, card, onnx, what)
        d_script = export_checked_torchscript(network, card, script, what)
        log(f"ONNX and TorchScript exports checked against PyTorch: largest differences {d_onnx:.2e}, {d_script:.2e}")
        written = write_card_model(card, repository, onnx, script)
    log(f"wrote {len(written)} files under {repository}: ensemble {card.name!r} "
        f"({', '.join(card.model_io(r).name for r in ('preprocess', 'segmenter', 'postprocess'))})")
    return written
