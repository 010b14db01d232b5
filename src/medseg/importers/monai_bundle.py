"""``medseg import monai-bundle``: a MONAI bundle -> a served model (card, ONNX checked against PyTorch, configs).

Reads a bundle in MONAI's layout: ``configs/metadata.json`` (the labels: the output's ``channel_def``),
``configs/inference.json`` or ``.yaml`` (parsed by MONAI's own ConfigParser: the ``network_def``, the
``preprocessing`` transforms, the ``inferer``, the ``postprocessing``) and ``models/model.pt``. Each transform is
mapped onto the card (orientation, spacing, interpolation, intensity, window, the way back); one the pipeline cannot
express is refused by name, never dropped: the labels would silently differ from the bundle's own.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from medseg_client.card import Inference, ModelCard, Normalization, Resampling
from medseg_client.errors import ArtifactError

IMAGE, PRED = "image", "pred"  # the keys MONAI's evaluators and bundles use (CommonKeys)
NO_OPS = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "EnsureTyped", "EnsureType",
          "ToTensord", "ToTensor", "Identityd", "Identity"}
POST_NO_OPS = {"SaveImaged", "SaveImage", "EnsureTyped", "EnsureType", "ToTensord", "Identityd", "Identity"}
SUPPORTED = ("LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd (bilinear or nearest), ScaleIntensityRanged, "
             "NormalizeIntensityd (fixed subtrahend and divisor), EnsureTyped")
SUPPORTED_POST = "Activationsd (softmax), Invertd, AsDiscreted (argmax), SaveImaged"


def _file(bundle: Path, *names: str) -> Path:
    for name in names:
        if (bundle / name).is_file():
            return bundle / name
    raise ArtifactError(f"{bundle}: expected a MONAI bundle holding {' or '.join(names)}, found none")


def _parser(bundle: Path) -> tuple[Any, dict[str, Any]]:
    """MONAI's ConfigParser over the bundle's inference config (bundle_root set to the bundle), and its metadata."""
    from monai.bundle import ConfigParser

    meta_file = _file(bundle, "configs/metadata.json")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_file}: not JSON ({e})") from None
    parser = ConfigParser()
    config = _file(bundle, "configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
    try:
        parser.read_config(str(config))
    except ValueError as e:  # JSON and YAML errors are ValueErrors
        raise ArtifactError(f"{config}: not a readable config ({str(e).splitlines()[0]})") from None
    parser.read_meta(meta)
    parser["bundle_root"] = str(bundle)
    return parser, meta


def _parsed(parser: Any, key: str) -> Any:
    if key not in parser:
        raise ArtifactError(f"configs/inference: no {key!r} (a bundle's inference config defines network_def, "
                            "preprocessing, inferer and postprocessing)")
    try:
        return parser.get_parsed_content(key)
    except Exception as e:  # whatever the bundle's expressions raise, said in one line (the root cause's)
        while e.__cause__ is not None and isinstance(e.__cause__, Exception):
            e = e.__cause__
        text = " ".join(str(e).split())[:300]
        raise ArtifactError(f"configs/inference: {key} cannot be built by MONAI ({type(e).__name__}: {text})") from None


def _transforms(compose: Any) -> list[Any]:
    """The transforms of a Compose (nested ones flattened)."""
    out: list[Any] = []
    for t in getattr(compose, "transforms", [compose]):
        out.extend(_transforms(t) if hasattr(t, "transforms") and not hasattr(t, "keys") else [t])
    return out


def _one(values: Any, what: str) -> Any:
    """The one setting of a dictionary transform's per-key tuple (medseg's bundles have one image key)."""
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    if len(set(map(str, values))) != 1:
        raise ArtifactError(f"configs/inference: {what} differs between keys ({values}): not supported")
    return values[0]


def _preprocessing(compose: Any) -> dict[str, Any]:
    """Orientation, spacing, interpolation order and intensity normalisation from the preprocessing, in MONAI's
    order (orient, resample, normalise): anything else refused by name."""
    found: dict[str, Any] = {}
    order = []
    for t in _transforms(compose):
        name = type(t).__name__
        keys = tuple(getattr(t, "keys", (IMAGE,)))
        if IMAGE not in keys:
            continue  # a transform of another key (a label, say) does not change the image
        if name in NO_OPS:
            continue
        if name == "Orientationd":
            o = t.ornt_transform
            found["orientation"] = "RAS" if o.as_closest_canonical else str(o.axcodes).upper()
        elif name == "Spacingd":
            s = t.spacing_transform
            pixdim = [float(p) for p in s.pixdim]
            if len(pixdim) != 3 or any(math.isnan(p) or p <= 0 for p in pixdim):
                raise ArtifactError(f"configs/inference: Spacingd pixdim {pixdim}: expected three positive spacings")
            mode, padding = str(_one(t.mode, "Spacingd mode")), str(_one(t.padding_mode, "Spacingd padding_mode"))
            orders = {"bilinear": 1, "GridSampleMode.BILINEAR": 1, "nearest": 0, "GridSampleMode.NEAREST": 0}
            if mode not in orders:
                raise ArtifactError(f"configs/inference: Spacingd mode {mode!r} is not supported (bilinear or nearest)")
            if padding not in ("border", "GridSamplePadMode.BORDER") or _one(t.align_corners, "align_corners") or \
                    s.scale_extent or not all(math.isnan(float(v)) for v in (*s.min_pixdim, *s.max_pixdim)):
                raise ArtifactError("configs/inference: Spacingd with padding_mode, align_corners, scale_extent or "
                                    "min/max_pixdim other than the defaults is not supported")
            found["spacing"], found["order"] = tuple(pixdim), orders[mode]
        elif name == "ScaleIntensityRanged":
            sc = t.scaler
            if sc.b_min is None or sc.b_max is None:
                raise ArtifactError("configs/inference: ScaleIntensityRanged without b_min/b_max is not supported")
            found["normalization"] = Normalization("scale_range", float(sc.a_min), float(sc.a_max),
                                                   out_lower=float(sc.b_min), out_upper=float(sc.b_max),
                                                   clip=bool(sc.clip))
        elif name == "NormalizeIntensityd":
            n = t.normalizer
            if n.subtrahend is None or n.divisor is None or n.nonzero or \
                    any(isinstance(v, (list, tuple)) for v in (n.subtrahend, n.divisor)):
                raise ArtifactError("configs/inference: NormalizeIntensityd is supported with one fixed subtrahend "
                                    "and divisor only (not statistics of each image, not nonzero=True)")
            found["normalization"] = Normalization("zscore", 0.0, 0.0, mean=float(n.subtrahend), std=float(n.divisor))
        else:
            raise ArtifactError(f"configs/inference: preprocessing transform {name} is not supported "
                                f"(medseg maps {SUPPORTED})")
        order.append({"Orientationd": "orientation", "Spacingd": "spacing"}.get(name, "normalization"))
    for needed in ("orientation", "spacing", "normalization"):
        if needed not in found:
            what = {"orientation": "Orientationd (without it the network sees files as stored, which DICOM has no "
                                   "fixed order for)", "spacing": "Spacingd", "normalization":
                    "ScaleIntensityRanged or NormalizeIntensityd"}[needed]
            raise ArtifactError(f"configs/inference: the preprocessing has no {what}: not supported")
    if order != ["orientation", "spacing", "normalization"]:
        raise ArtifactError(f"configs/inference: preprocessing in the order {' -> '.join(order)} is not supported "
                            "(Orientationd, then Spacingd, then the intensity transform)")
    return found


def _inference(inferer: Any) -> Inference:
    name = type(inferer).__name__
    if name != "SlidingWindowInferer":
        raise ArtifactError(f"configs/inference: inferer {name} is not supported (SlidingWindowInferer)")
    roi = tuple(int(r) for r in inferer.roi_size)
    overlap = set(inferer.overlap) if isinstance(inferer.overlap, (tuple, list)) else {inferer.overlap}
    mode = str(getattr(inferer.mode, "value", inferer.mode))
    if len(roi) != 3 or min(roi) <= 0:
        raise ArtifactError(f"configs/inference: SlidingWindowInferer roi_size {roi}: expected three positive sizes")
    if len(overlap) != 1 or mode not in ("constant", "gaussian") or float(inferer.sigma_scale) != 0.125 or \
            str(getattr(inferer.padding_mode, "value", inferer.padding_mode)) != "constant" or inferer.cval != 0 or \
            inferer.roi_weight_map is not None or inferer.with_coord:
        raise ArtifactError("configs/inference: SlidingWindowInferer with per-axis overlaps, sigma_scale, "
                            "padding_mode, cval, roi_weight_map or with_coord other than the defaults is not supported")
    return Inference("sliding_window", roi, 1 - float(overlap.pop()), mode == "gaussian")  # type: ignore[arg-type]


def _postprocessing(compose: Any, data_order: int) -> Resampling:
    """The way back: softmax before inverting (probabilities resampled) or argmax before (labels, nearest)."""
    steps = []
    for t in _transforms(compose):
        name = type(t).__name__
        if PRED not in tuple(getattr(t, "keys", (PRED,))) or name in POST_NO_OPS:
            continue
        if name == "Activationsd":
            if any(t.sigmoid) or any(o is not None for o in t.other) or not all(t.softmax):
                raise ArtifactError("configs/inference: Activationsd other than softmax=True is not supported")
            steps.append("softmax")
        elif name == "Invertd":
            steps.append("invert_nearest" if _one(t.nearest_interp, "Invertd nearest_interp") else "invert")
        elif name == "AsDiscreted":
            if not all(t.argmax) or any(v is not None for v in (*t.to_onehot, *t.threshold, *t.rounding)):
                raise ArtifactError("configs/inference: AsDiscreted other than argmax=True is not supported")
            steps.append("argmax")
        else:
            raise ArtifactError(f"configs/inference: postprocessing transform {name} is not supported "
                                f"(medseg maps {SUPPORTED_POST})")
    inverted = [s for s in steps if s.startswith("invert")]
    if len(inverted) != 1 or steps.count("argmax") != 1 or steps.count("softmax") > 1:
        raise ArtifactError(f"configs/inference: postprocessing {' -> '.join(steps) or 'empty'}: expected one Invertd "
                            "(the labels on the study's grid) and one AsDiscreted(argmax)")
    before = steps[:steps.index(inverted[0])]
    if "argmax" in before:  # labels go back: only nearest keeps them labels
        if data_order != 0 and inverted[0] != "invert_nearest":
            raise ArtifactError("configs/inference: AsDiscreted(argmax) before Invertd without nearest_interp=True "
                                "resamples label values linearly: not supported")
        return Resampling(data_order, 0, 0, softmax=False)
    return Resampling(data_order, 0 if inverted[0] == "invert_nearest" or data_order == 0 else 1, 0,
                      softmax="softmax" in before)


def _labels(meta: dict[str, Any], num_classes: int) -> list[tuple[int, str]]:
    try:
        out = meta["network_data_format"]["outputs"][PRED]
        channels = {int(k): str(v) for k, v in out["channel_def"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ArtifactError("configs/metadata.json: no network_data_format.outputs.pred.channel_def (the labels)") from None
    if sorted(channels) != list(range(num_classes)):
        raise ArtifactError(f"configs/metadata.json: channel_def {channels} must name channels 0..{num_classes - 1} "
                            f"(the network gives {num_classes})")
    names = [n.strip().lower().replace(" ", "_") for n in channels.values()]
    if len(set(names)) != len(names):
        raise ArtifactError(f"configs/metadata.json: channel_def names repeat: {channels}")
    return [(k, n.strip().lower().replace(" ", "_")) for k, n in channels.items()]


def _weights(bundle: Path, network: Any) -> str:
    """Load models/model.pt into the network (a state dict, or one under ``model``); its sha256."""
    import torch

    path = _file(bundle, "models/model.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: does not fit the network_def ({str(e).splitlines()[0]})") from None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_bundle(bundle: Path, name: str) -> tuple[ModelCard, Any]:
    """The card of a bundle and its network (weights loaded, in eval mode)."""
    import torch

    parser, meta = _parser(bundle)
    pre = _preprocessing(_parsed(parser, "preprocessing"))
    inference = _inference(_parsed(parser, "inferer"))
    resampling = _postprocessing(_parsed(parser, "postprocessing"), pre["order"])
    network = _parsed(parser, "network_def")
    if not isinstance(network, torch.nn.Module):
        raise ArtifactError(f"configs/inference: network_def builds a {type(network).__name__}, not a torch module")
    sha = _weights(bundle, network)
    network = network.eval()
    with torch.inference_mode():
        classes = int(network(torch.zeros(1, 1, *inference.patch)).shape[1])
    from medseg.importers.common import plain_labels

    card = ModelCard(
        name=name,
        version=1,
        description=f"MONAI bundle {meta.get('name', bundle.name)} {meta.get('version', '')}".strip(),
        labels=plain_labels(_labels(meta, classes)),
        spacing=pre["spacing"],
        transpose=(2, 1, 0),  # MONAI's arrays are (x, y, z); medseg's canonical grid is (z, y, x)
        crop_to_nonzero=False,
        normalization=pre["normalization"],
        resampling=resampling,
        inference=inference,
        orientation=pre["orientation"],
        pipeline="monai",
        source={"kind": "monai-bundle", "folder": bundle.name, "bundle": meta.get("name", ""),
                "bundle_version": meta.get("version", ""), "monai_version": meta.get("monai_version", ""),
                "weights": "models/model.pt", "sha256": sha},
    )
    card.flips()  # refuses an orientation that is not one
    return card, network


def import_monai_bundle(bundle: Path, name: str, repository: Path, label_codes: Path | None = None,
                        log: Any = print) -> ModelCard:
    """The whole import: card, ONNX and TorchScript (checked against PyTorch), configs and files in ``repository``."""
    import warnings

    from medseg.importers.common import check_name, with_label_codes, write_model

    check_name(name, repository)
    bundle = bundle.resolve()
    if not bundle.is_dir():
        raise ArtifactError(f"{bundle}: not a folder (expected a MONAI bundle: configs/, models/)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notes about its own defaults
        card, network = read_bundle(bundle, name)
    if label_codes is not None:
        card = with_label_codes(card, label_codes)
    inf = card.inference
    log(f"{bundle.name}: {card.num_classes - 1} labels ({', '.join(lab.name for lab in card.labels[1:])}), "
        f"oriented {card.orientation}, spacing {card.spacing} mm, ROI {inf.patch}, overlap {1 - inf.step:g}, "
        f"{'gaussian' if inf.gaussian else 'constant'} blending, back via "
        f"{'probabilities' if card.resampling.softmax else 'labels' if card.resampling.logits_order == 0 else 'logits'}")
    write_model(network, card, repository, bundle.name, log)
    return card
