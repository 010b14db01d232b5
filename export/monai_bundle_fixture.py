"""A MONAI bundle in the model zoo's layout, trained here on phantoms, for the MONAI importer's parity tests.

    python -m export.monai_bundle_fixture      # writes tests/fixtures/monai_bundle/ (about 15 minutes on 2 cores)

What a hospital would hand over: ``configs/metadata.json`` (labels in ``channel_def``), ``configs/inference.json``
(the network's ``network_def``, the preprocessing, a sliding-window inferer, the postprocessing with ``Invertd``,
an ignite evaluator that MONAI's bundle runner, ``python -m monai.bundle run``, executes) and ``models/model.pt``.
The training cases go through the bundle's own preprocessing (instantiated from its ``inference.json`` by MONAI's
ConfigParser), so the network sees what the runner gives it. The phantoms are this project's (seeds 6000-6015, the
nnU-Net fixture's, never a test's), the same four organs (its label_codes.json codes them too); real CT is
never used.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.nnunet_fixture import LABELS, SEEDS, _coarse
from medseg.paths import REPO_ROOT
from medseg_client.io.studies import save_nifti

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "monai_bundle"
BUNDLE = FIXTURE / "phantom_organs_ct"
ROI = (64, 64, 64)
PIXDIM = (3.0, 3.0, 3.0)
WINDOW = (-200.0, 300.0)

NETWORK_DEF = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": len(LABELS),
               "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "instance"}


def inference_config() -> dict[str, Any]:
    """``configs/inference.json`` as the MONAI model zoo writes them (spleen_ct_segmentation's shape)."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": NETWORK_DEF,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(PIXDIM), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": WINDOW[0], "a_max": WINDOW[1],
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(ROI), "sw_batch_size": 4, "overlap": 0.5,
                    "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(monai_version: str, torch_version: str) -> dict[str, Any]:
    """``configs/metadata.json``: the labels in the output's ``channel_def``."""
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "trained on medseg phantoms for the importer's parity tests"},
        "monai_version": monai_version,
        "pytorch_version": torch_version,
        "numpy_version": np.__version__,
        "optional_packages_version": {"nibabel": "", "pytorch-ignite": ""},
        "name": "Phantom organs CT segmentation",
        "task": "Liver, spleen and kidney segmentation in (synthetic) CT",
        "description": "A small UNet trained on medseg's synthetic phantoms; a test fixture, not a clinical model",
        "authors": "medseg",
        "copyright": "medseg",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": list(ROI), "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(LABELS),
                                 "spatial_shape": list(ROI), "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True,
                                 "channel_def": {str(v): k for k, v in sorted(LABELS.items(), key=lambda kv: kv[1])}}},
        },
    }


def _cases(work: Path) -> list[dict[str, str]]:
    """The phantoms as NIfTI files (stored LPS, ~3 mm), image and label."""
    cases = []
    regions = ["abdomen"] * 10 + ["chest_abdomen"] * 3 + ["abdomen_pelvis"] * 3
    for seed, region in zip(SEEDS, regions, strict=True):
        ct, labels, affine = _coarse(seed, region)
        img, lab = work / f"case_{seed}.nii.gz", work / f"case_{seed}_label.nii.gz"
        save_nifti(ct.transpose(2, 1, 0), affine, img)
        save_nifti(labels.transpose(2, 1, 0), affine, lab)
        cases.append({"image": str(img), "label": str(lab)})
    return cases


def _preprocessed(cases: list[dict[str, str]], config: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each case through the bundle's own preprocessing (the label alongside, nearest)."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    parser = ConfigParser(config)
    image_pre = parser.get_parsed_content("preprocessing")
    label_pre = Compose([LoadImaged("label"), EnsureChannelFirstd("label"), Orientationd("label", axcodes="RAS"),
                         Spacingd("label", pixdim=PIXDIM, mode="nearest")])
    out = []
    for case in cases:
        image = np.asarray(image_pre({"image": case["image"]})["image"], np.float32)
        label = np.asarray(label_pre({"label": case["label"]})["label"], np.int64)
        if image.shape != label.shape:
            raise RuntimeError(f"{case['image']}: image {image.shape} and label {label.shape} differ after preprocessing")
        out.append((image, label))
    return out


def _batch(data: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ROI crops, two in three centred on a random organ voxel (every organ equally often)."""
    xs, ys = [], []
    for _ in range(size):
        image, label = data[int(rng.integers(len(data)))]
        short = [max(0, r - s) for s, r in zip(image.shape[1:], ROI, strict=True)]
        pad = [(0, 0)] + [(d // 2, d - d // 2) for d in short]
        image, label = np.pad(image, pad), np.pad(label, pad)
        present = [k for k in range(1, len(LABELS)) if (label == k).any()]
        if present and rng.random() < 2 / 3:
            vox = np.argwhere(label[0] == present[int(rng.integers(len(present)))])
            centre = vox[int(rng.integers(len(vox)))]
        else:
            centre = np.array([int(rng.integers(s)) for s in image.shape[1:]])
        lo = [int(np.clip(c - r // 2, 0, s - r)) for c, r, s in zip(centre, ROI, image.shape[1:], strict=True)]
        sl = (slice(None), *(slice(a, a + r) for a, r in zip(lo, ROI, strict=True)))
        x = image[sl] * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
        xs.append(x + rng.normal(0, 0.02, x.shape))
        ys.append(label[sl])
    return np.stack(xs).astype(np.float32), np.stack(ys)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=BUNDLE)
    ap.add_argument("--iterations", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    import monai
    import torch
    from monai.bundle import ConfigParser
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = inference_config()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medseg-bundle-") as tmp:
        data = _preprocessed(_cases(Path(tmp)), config)
    print(f"{len(data)} phantoms through the bundle's preprocessing ({time.perf_counter() - t0:.0f} s)", flush=True)
    net = ConfigParser({"network_def": NETWORK_DEF}).get_parsed_content("network_def")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.iterations, pct_start=0.1)
    net.train()
    running = 0.0
    for it in range(1, args.iterations + 1):
        x, y = _batch(data, rng, args.batch)
        loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if it > 1 else loss.item()
        if it % 100 == 0:
            print(f"iteration {it}/{args.iterations}: loss {running:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    net.eval()
    out: Path = args.out
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    (out / "docs").mkdir(exist_ok=True)
    (out / "configs" / "inference.json").write_text(json.dumps(config, indent=4) + "\n")
    (out / "configs" / "metadata.json").write_text(
        json.dumps(metadata(monai.__version__, torch.__version__.split("+")[0]), indent=4) + "\n")
    (out / "docs" / "README.md").write_text(
        "# Phantom organs CT segmentation\n\nA MONAI bundle made by `python -m export.monai_bundle_fixture` "
        "(medseg) from synthetic phantoms: a test fixture for `medseg import monai-bundle`, not a clinical model.\n")
    torch.save(net.state_dict(), out / "models" / "model.pt")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
