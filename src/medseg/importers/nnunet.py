"""``medseg import nnunet``: an nnU-Net v2 results folder -> a served model (card, ONNX checked against PyTorch, configs).

Reads ``plans.json``, ``dataset.json`` and ``fold_*/checkpoint_*.pth`` of a ``<trainer>__<plans>__3d_fullres``
folder; builds the network as nnU-Net does (the plans' class and arguments, via dynamic_network_architectures) and
loads each fold's weights; exports one ONNX model whose output is the folds' mean logits on one tile (a batch of
mirrored tiles in one call); writes the card. What the pipeline cannot reproduce is refused by name: 2-D or
cascade configurations, region-based labels, non-CT normalisation schemes, other resampling functions, several
input channels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from medseg.importers.common import plain_labels
from medseg_client.card import Inference, ModelCard, Normalization, Resampling
from medseg_client.errors import ArtifactError
from medseg_client.spec import Label

CONFIGURATION = "3d_fullres"
RESAMPLING_FN = "resample_data_or_seg_to_shape"


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path.parent.name}: expected an nnU-Net results folder holding {path.name}, found none")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not JSON ({e})") from None


def _configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    configs = plans.get("configurations", {})
    if name not in configs:
        raise ArtifactError(f"plans.json has no {name!r} configuration (has {sorted(configs)})")
    config = dict(configs[name])
    if "inherits_from" in config:
        config = {**_configuration(plans, config.pop("inherits_from")), **config}
    return config


def _labels(dataset: dict[str, Any]) -> tuple[Label, ...]:
    raw = dataset.get("labels", {})
    if any(not isinstance(v, int) for v in raw.values()) or "regions_class_order" in dataset:
        raise ArtifactError("dataset.json: region-based labels are not supported (each label must be one integer)")
    values = sorted((int(v), k) for k, v in raw.items())
    if not values or values[0][0] != 0 or [v for v, _ in values] != list(range(len(values))):
        raise ArtifactError(f"dataset.json: labels must be 0 (background), 1, 2, ... without gaps; got {raw}")
    return plain_labels(values)


def read_card(results: Path, name: str, mirror_axes: tuple[int, ...], step: float, checkpoints: list[Path]) -> ModelCard:
    """The card of an nnU-Net results folder: labels, spacing, transposes, normalisation, resampling, window."""
    plans, dataset = _json(results / "plans.json"), _json(results / "dataset.json")
    config = _configuration(plans, CONFIGURATION)
    if config.get("previous_stage"):
        raise ArtifactError(f"{CONFIGURATION} of {results.name} is a cascade stage (needs {config['previous_stage']}): "
                            "not supported")
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    if len(channels) != 1:
        raise ArtifactError(f"dataset.json: expected one input channel (CT), got {len(channels)}: {channels}")
    schemes = config.get("normalization_schemes", [])
    if schemes != ["CTNormalization"]:
        raise ArtifactError(f"plans.json: normalization {schemes} is not supported (only CTNormalization)")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key) != RESAMPLING_FN:
            raise ArtifactError(f"plans.json: {key} {config.get(key)!r} is not supported (only {RESAMPLING_FN})")
    data_kw, prob_kw = config.get("resampling_fn_data_kwargs", {}), config.get("resampling_fn_probabilities_kwargs", {})
    for key, kw in (("resampling_fn_data_kwargs", data_kw), ("resampling_fn_probabilities_kwargs", prob_kw)):
        if kw.get("force_separate_z") is not None:
            raise ArtifactError(f"plans.json: {key} force_separate_z={kw['force_separate_z']} is not supported")
    if data_kw.get("order_z", 0) != 0 or prob_kw.get("order_z", 0) != 0:
        raise ArtifactError("plans.json: order_z other than 0 (nearest along the coarse axis) is not supported")
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    sha = hashlib.sha256()
    for ck in checkpoints:
        sha.update(ck.read_bytes())
    return ModelCard(
        name=name,
        version=1,
        description=f"nnU-Net v2 {results.name} ({plans.get('dataset_name', '?')}), folds "
                    f"{', '.join(ck.parent.name.removeprefix('fold_') for ck in checkpoints)}",
        labels=_labels(dataset),
        spacing=tuple(float(s) for s in config["spacing"]),  # type: ignore[arg-type]
        transpose=tuple(int(t) for t in plans.get("transpose_forward", (0, 1, 2))),  # type: ignore[arg-type]
        crop_to_nonzero=True,  # nnU-Net's DefaultPreprocessor always crops
        normalization=Normalization("ct", float(stats["percentile_00_5"]), float(stats["percentile_99_5"]),
                                    float(stats["mean"]), float(stats["std"])),
        resampling=Resampling(int(data_kw.get("order", 3)), int(prob_kw.get("order", 1)), 0),
        inference=Inference("sliding_window", tuple(int(p) for p in config["patch_size"]), step, True,  # type: ignore[arg-type]
                            mirror_axes),
        source={"kind": "nnunet-v2", "folder": results.name, "dataset": plans.get("dataset_name", ""),
                "configuration": CONFIGURATION, "checkpoints": [f"{ck.parent.name}/{ck.name}" for ck in checkpoints],
                "sha256": sha.hexdigest()},
    )


def _network(plans: dict[str, Any], dataset: dict[str, Any], num_classes: int) -> Any:
    """The plans' network as nnU-Net builds it for inference (no deep supervision)."""
    import pydoc

    arch = _configuration(plans, CONFIGURATION)["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    cls: Any = pydoc.locate(arch["network_class_name"])
    if cls is None:
        raise ArtifactError(f"plans.json: network class {arch['network_class_name']} not found "
                            "(pip install dynamic-network-architectures)")
    return cls(input_channels=len(dataset["channel_names"]), num_classes=num_classes, deep_supervision=False, **kwargs)


def fold_checkpoints(results: Path, folds: list[str] | None, checkpoint: str) -> list[Path]:
    """The checkpoint of each fold asked for (default: every ``fold_N``)."""
    names = [f"fold_{f}" for f in folds] if folds else sorted(p.name for p in results.glob("fold_*") if p.is_dir())
    if not names:
        raise ArtifactError(f"{results}: no fold_* folder")
    paths = [results / n / checkpoint for n in names]
    missing = [str(p.relative_to(results)) for p in paths if not p.is_file()]
    if missing:
        raise ArtifactError(f"{results.name}: missing {', '.join(missing)}")
    return paths


def fold_mean(results: Path, checkpoints: list[Path], card: ModelCard) -> Any:
    """The network whose output is the folds' mean logits on a batch of tiles, each fold's weights loaded."""
    import torch

    plans, dataset = _json(results / "plans.json"), _json(results / "dataset.json")
    nets = []
    for ck in checkpoints:
        state = torch.load(ck, map_location="cpu", weights_only=False)
        net = _network(plans, dataset, card.num_classes)
        net.load_state_dict(state["network_weights"])
        nets.append(net.eval())

    class FoldMean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.folds = torch.nn.ModuleList(nets)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([f(x) for f in self.folds]).mean(0) if len(self.folds) > 1 else self.folds[0](x)

    return FoldMean().eval()


def import_nnunet(results: Path, name: str, repository: Path, folds: list[str] | None = None,
                  checkpoint: str = "checkpoint_final.pth", mirroring: bool = True, step: float = 0.5,
                  label_codes: Path | None = None, orientation: str = "LPS", log: Any = print) -> ModelCard:
    """The whole import: card, ONNX and TorchScript (checked against PyTorch), configs and files in ``repository``."""
    from medseg.importers.common import check_name, with_label_codes, write_model

    check_name(name, repository)
    results = results.resolve()
    checkpoints = fold_checkpoints(results, folds, checkpoint)
    mirror_axes: tuple[int, ...] = ()
    if mirroring:
        import torch

        saved = torch.load(checkpoints[0], map_location="cpu", weights_only=False).get("inference_allowed_mirroring_axes")
        mirror_axes = tuple(int(a) for a in saved) if saved is not None else (0, 1, 2)
    card = replace(read_card(results, name, mirror_axes, step, checkpoints), orientation=orientation.upper())
    card.flips()  # refuses an orientation that is not one
    if label_codes is not None:
        card = with_label_codes(card, label_codes)
    log(f"{results.name}: {card.num_classes - 1} labels ({', '.join(lab.name for lab in card.labels[1:])}), "
        f"spacing {card.spacing} mm, patch {card.inference.patch}, mirroring {card.inference.mirror_axes or 'off'}, "
        f"{len(checkpoints)} fold(s), input oriented {card.orientation}")
    write_model(fold_mean(results, checkpoints, card), card, repository, results.name, log)
    return card
