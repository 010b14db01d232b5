"""Train the demo segmenter (MONAI 3-D UNet, Dice + CE, patch sampling) on phantoms and ship its weights.

    python -m export.train [--epochs N] [--iters-per-epoch N] [--out export/weights]

The training data are phantoms only (``export.data``: whole-body phantoms, a fifth of them scans that hold no
liver). Real CT (``make realct``, TotalSegmentator's reference files) is for development and acceptance and is
**never training data**. Patches get the intensity, contrast, blur, noise and resolution augmentations real
scans call for, and small rotations and scalings (never a left-right flip: the liver is on the right).

Validation runs every epoch whole-volume, exactly as served, on held-out phantoms: liver and tumor Dice on
those holding a liver, and the false liver volume on those that hold none; the best checkpoint is kept,
stored as fp16, and described by a manifest (cases, recipe, epochs, validation figures, sha256). The same
command with the same arguments reproduces the weights up to floating-point nondeterminism of the CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.augment import TUMOR, RandScanEndd, RandSyntheticTumord
from export.data import PHANTOM_RECIPE, TRAIN_MIX, VAL_CASES, load_cases, scan_end_cases, train_cases
from medseg.accuracy.metrics import dice
from medseg.model.network import MANIFEST_FILE, WEIGHTS_FILE, build_network, sha256_of
from medseg_client.spec import SPEC, padded_shape

PATCH = (96, 96, 96)
BATCH = 2  # patches per step, each from another case
FALSE_LIVER_SCALE_ML = 100.0  # a scan without a liver costs its validation score in full at this much false liver


def predict_volume(model: Any, image: np.ndarray) -> np.ndarray:
    """Labels (Z, Y, X) of an unpadded (1, Z, Y, X) image, run whole-volume as served."""
    import torch

    grid = image.shape[1:]
    target = padded_shape(grid)  # type: ignore[arg-type]
    padded = np.zeros((1, 1, *target), np.float32)
    padded[0, :, : grid[0], : grid[1], : grid[2]] = image
    with torch.inference_mode():
        logits = model(torch.from_numpy(padded))[0]
    return logits[:, : grid[0], : grid[1], : grid[2]].argmax(0).numpy().astype(np.uint8)


def validate(model: Any, cases: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean Dice of the whole liver (labels 1+2) and of the tumors (label 2) over the cases holding a liver;
    the mean false liver volume (mL) over those holding none."""
    liver, tumor, false_ml = [], [], []
    voxel_ml = float(np.prod(SPEC.model_spacing)) / 1000.0
    model.eval()
    for image, labels in cases:
        pred = predict_volume(model, image)
        truth = labels[0]
        if truth.any():
            liver.append(dice(pred > 0, truth > 0))
            tumor.append(dice(pred == TUMOR, truth == TUMOR))
        else:
            false_ml.append(float((pred > 0).sum()) * voxel_ml)
    return {"liver": float(np.mean(liver)), "tumor": float(np.mean(tumor)),
            "false_liver_ml": float(np.mean(false_ml)) if false_ml else 0.0}


def score(scores: dict[str, float]) -> float:
    """One number to keep the best epoch by: mean of liver and tumor Dice, less the false-liver penalty."""
    return (scores["liver"] + scores["tumor"]) / 2 - 0.5 * min(1.0, scores["false_liver_ml"] / FALSE_LIVER_SCALE_ML)


def augmentations(synthetic_tumors: float, class_ratios: tuple[float, ...], seed: int, scan_ends: float = 0.0) -> Any:
    """Patch sampling and the augmentations of one training step (MONAI dictionary transforms)."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandCropByLabelClassesd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSimulateLowResolutiond,
        SpatialPadd,
    )

    return Compose([
        SpatialPadd(keys=("image", "label"), spatial_size=PATCH),
        RandCropByLabelClassesd(keys=("image", "label"), label_key="label", spatial_size=PATCH,
                                ratios=list(class_ratios), num_classes=SPEC.num_classes, num_samples=1,
                                warn=False),
        RandSyntheticTumord(prob=synthetic_tumors, seed=seed),
        RandAffined(keys=("image", "label"), prob=0.25, rotate_range=(0.1, 0.1, 0.2), scale_range=(0.12, 0.12, 0.12),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.06, prob=0.5),
        RandAdjustContrastd(keys="image", prob=0.2, gamma=(0.8, 1.25)),
        RandGaussianSmoothd(keys="image", prob=0.15, sigma_x=(0.4, 1.0), sigma_y=(0.4, 1.0), sigma_z=(0.4, 1.2)),
        RandSimulateLowResolutiond(keys="image", prob=0.15, zoom_range=(0.5, 1.0)),
        RandGaussianNoised(keys="image", prob=0.2, std=0.03),
        RandScanEndd(prob=scan_ends, seed=seed),
    ])


def stored(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict as shipped: weights in float16 (half the size); batch norm's running statistics as they
    are (float32, int64): a deep layer's running variance exceeds float16's range and would become inf."""
    return {k: v.detach().cpu().clone() if "running_" in k or not v.is_floating_point() else v.detach().cpu().half()
            for k, v in state.items()}


def load_init(model: Any, init: Path) -> None:
    """Start from earlier weights (fp16 state dict). Weights of another normalisation (v1's instance norm, which
    holds no parameters) load their convolutions; the new norm layers start fresh. Anything else that does not
    fit is an error."""
    import torch

    state = {k: v.float() for k, v in torch.load(init, map_location="cpu", weights_only=True).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    norm_keys = (".weight", ".bias", ".running_mean", ".running_var", ".num_batches_tracked")
    missing = [k for k in missing if not (".adn.N." in k and k.endswith(norm_keys))]
    if missing or unexpected:
        raise ValueError(f"{init} does not fit the network: missing {missing[:5]}, unexpected {unexpected[:5]}")


def train(epochs: int, iters_per_epoch: int, out: Path, seed: int, lr: float, init: Path | None = None,
          class_ratios: tuple[float, ...] = (1, 2, 3), ce_weights: tuple[float, ...] = (1, 1, 1),
          synthetic_tumors: float = 0.0, scan_ends: float = 0.0) -> dict[str, Any]:
    """Run the training and write weights + manifest to ``out``; returns the manifest."""
    import torch
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from tqdm import tqdm

    set_determinism(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    cases = load_cases(train_cases(), "training phantoms")
    val_cases = load_cases(VAL_CASES, "validation phantoms")
    if scan_ends:  # validated as served on scans that stop inside the liver too (not in the recorded stages)
        val_cases += scan_end_cases(val_cases)
    sample = augmentations(synthetic_tumors, class_ratios, seed, scan_ends)
    model = build_network()
    if init is not None:  # continue from earlier weights (fp16 state dict)
        load_init(model, init)
    model = model.to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, weight=torch.tensor(ce_weights, dtype=torch.float32, device=device))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    total = epochs * iters_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    scaler = torch.amp.GradScaler(enabled=amp)
    rng = np.random.default_rng(seed)
    best: dict[str, Any] = {"score": -1.0}
    history = []
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        bar = tqdm(range(iters_per_epoch), desc=f"epoch {epoch}/{epochs}", unit="it", leave=False)
        for _ in bar:
            # one patch from each of two cases: batch norm's statistics then span two studies, not one
            patches = [p for i in rng.choice(len(cases), size=BATCH, replace=False)
                       for p in sample({"image": cases[int(i)][0], "label": cases[int(i)][1]})]
            x = torch.stack([torch.as_tensor(np.asarray(p["image"])) for p in patches]).to(device)
            y = torch.stack([torch.as_tensor(np.asarray(p["label"])) for p in patches]).to(device).long()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(float(loss))
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        model.cpu()
        scores = validate(model, val_cases)
        model.to(device)
        value = score(scores)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **scores})
        marker = ""
        if value > best["score"]:
            best = {"score": value, "epoch": epoch, "dice": scores,
                    "state": stored(model.state_dict())}
            marker = " *best*"
        print(f"epoch {epoch:3d}  loss {np.mean(losses):.4f}  val Dice liver {scores['liver']:.4f} "
              f"tumor {scores['tumor']:.4f}  false liver {scores['false_liver_ml']:.1f} mL  ({time.time() - t0:.0f}s){marker}",
              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE.name
    torch.save(best["state"], weights)
    manifest = {
        "model": SPEC.segmenter.name,
        "spec_version": SPEC.version,
        "network": {"type": "monai.networks.nets.UNet", "channels": list(SPEC.network.channels),
                    "strides": list(SPEC.network.strides), "num_res_units": SPEC.network.num_res_units,
                    "norm": SPEC.network.norm},
        "storage": "float16 state_dict; batch-norm statistics float32",
        "sha256": sha256_of(weights),
        "seed": seed,
        "data_recipe": {"generator": PHANTOM_RECIPE, "train_cases": [[s, r] for s, r in train_cases()],
                        "train_mix": TRAIN_MIX, "val_cases": [[s, r] for s, r in VAL_CASES], "patch": list(PATCH),
                        "augmentations": "affine (p 0.25), intensity scale/shift, gamma, blur, low resolution, noise"
                                         + (f", scan ending inside the liver (p {scan_ends:g})" if scan_ends else ""),
                        **({"val_scan_ends": "each validation case with a liver also stopped at 70% of its liver's"
                                              " z extent, from either end"} if scan_ends else {}),
                        "never_training_data": "real CT (make realct): development and acceptance only",
                        "class_ratios": list(class_ratios), "ce_weights": list(ce_weights),
                        "synthetic_tumors": synthetic_tumors, "scan_ends": scan_ends,
                        "preprocessing": "medseg.ops.dali_pipeline.ct_preprocess (DALI, CPU)"},
        "epochs": epochs,
        "iters_per_epoch": iters_per_epoch,
        "best_epoch": best["epoch"],
        "val_dice": best["dice"],
        "history": history,
        "trained_on": f"{platform.machine()} {device.type}, torch {torch.__version__}",
        "train_seconds": round(time.time() - t0, 1),
        "command": f"python -m export.train --epochs {epochs} --iters-per-epoch {iters_per_epoch} --seed {seed} --lr {lr}"
                   f" --class-ratios {' '.join(f'{r:g}' for r in class_ratios)}"
                   f" --ce-weights {' '.join(f'{w:g}' for w in ce_weights)} --synthetic-tumors {synthetic_tumors:g}"
                   + (f" --scan-ends {scan_ends:g}" if scan_ends else "")
                   + (f" --init {init}" if init else ""),
        "initialized_from": None if init is None else {"file": init.name, "sha256": sha256_of(init)},
        "previous_stages": previous_stages(init),
    }
    (out / MANIFEST_FILE.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def stage_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What one training stage did, for the record of the stages after it."""
    keys = ("command", "epochs", "iters_per_epoch", "best_epoch", "val_dice", "sha256", "train_seconds", "trained_on")
    return {k: manifest.get(k) for k in keys}


def previous_stages(init: Path | None) -> list[dict[str, Any]]:
    """The stages that made ``init``: read from the manifest beside it, if there is one."""
    if init is None or not (init.parent / MANIFEST_FILE.name).exists():
        return []
    before = json.loads((init.parent / MANIFEST_FILE.name).read_text())
    return [*before.get("previous_stages", []), stage_summary(before)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--iters-per-epoch", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=WEIGHTS_FILE.parent)
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (fp16 state dict)")
    ap.add_argument("--class-ratios", type=float, nargs=3, default=(1, 2, 3), help="patch centres per class")
    ap.add_argument("--ce-weights", type=float, nargs=3, default=(1, 1, 1), help="cross-entropy class weights")
    ap.add_argument("--synthetic-tumors", type=float, default=0.0, help="probability of painting tumors into a patch")
    ap.add_argument("--scan-ends", type=float, default=0.0, help="probability of a patch's scan ending inside its liver")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    m = train(args.epochs, args.iters_per_epoch, args.out, args.seed, args.lr, args.init,
              tuple(args.class_ratios), tuple(args.ce_weights), args.synthetic_tumors, args.scan_ends)
    print(f"best epoch {m['best_epoch']}: val Dice liver {m['val_dice']['liver']:.4f} tumor {m['val_dice']['tumor']:.4f}")
    print(f"wrote {args.out / WEIGHTS_FILE.name} (sha256 {m['sha256'][:16]}...) and {MANIFEST_FILE.name}")


if __name__ == "__main__":
    main()
