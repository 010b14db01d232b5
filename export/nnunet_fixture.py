"""An nnU-Net v2 results folder made by nnU-Net's own code, for the importer's parity tests.

    python -m export.nnunet_fixture            # writes tests/fixtures/nnunet/ (a few minutes on 2 cores)

Phantoms this project generates (seeds 6000-6015, never the test seeds) become an nnU-Net raw dataset; nnU-Net's
fingerprint extraction and experiment planner plan it; the plans are shrunk (a small patch and network, so the
run takes minutes on a CPU); nnU-Net's preprocessing and its base trainer (``nnUNetTrainer``, a short schedule) train
fold 0. What is kept is the results folder a hospital would hand over: ``plans.json``, ``dataset.json``,
``dataset_fingerprint.json`` and ``fold_0/checkpoint_final.pth``, in nnU-Net's layout. Real CT is never used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from medseg.paths import REPO_ROOT
from medseg.synth.phantom import ORGANS, generate
from medseg_client.io.studies import _RAS_FROM_LPS, save_nifti

DATASET_ID, DATASET_NAME = 901, "Dataset901_PhantomOrgans"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "nnunet"
RESULTS_FOLDER = FIXTURE / DATASET_NAME / TRAINER_FOLDER
SEEDS = tuple(range(6000, 6016))  # never used by the shipped model's training or any test
# four abdominal organs (the liver with its tumors): a multi-organ model like a hospital's, unlike the shipped one
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
# the shrunk network: nnU-Net's topology rules (get_pool_and_conv_props) for this patch, these features per stage
# DICOM codes for the labels (SNOMED CT), as a hospital writes them for `medseg import nnunet --label-codes`
ANATOMY = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
LABEL_CODES = {
    "liver": {"category": ANATOMY, "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}, "display": "Liver"},
    "spleen": {"category": ANATOMY, "type": {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"}, "display": "Spleen"},
    "kidney_right": {"category": ANATOMY, "type": {"value": "9846003", "scheme": "SCT", "meaning": "Right kidney"},
                     "display": "Right kidney"},
    "kidney_left": {"category": ANATOMY, "type": {"value": "18639004", "scheme": "SCT", "meaning": "Left kidney"},
                    "display": "Left kidney"},
}
LABEL_CODES_FILE = FIXTURE / "label_codes.json"
PATCH = (32, 64, 64)
FEATURES = (8, 16, 32, 64, 96, 96)


def _coarse(seed: int, region: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phantom at about 3 mm (4x4 in-plane block means, z slabs to >= 2.5 mm): CT, labels, RAS affine."""
    ph = generate(seed, region=region)
    assert ph.organs is not None
    organs = np.zeros_like(ph.labels)
    organs[ph.labels > 0] = LABELS["liver"]
    for name, value in ORGANS.items():
        organs[(ph.organs == value) & (ph.labels == 0)] = LABELS[name]
    fz = max(1, round(2.5 / ph.spacing[0] + 0.49))
    nz = ph.ct.shape[0] // fz * fz
    ct = ph.ct[:nz].astype(np.float32).reshape(nz // fz, fz, 128, 4, 128, 4).mean(axis=(1, 3, 5))
    labels = organs[:nz][fz // 2::fz, 2::4, 2::4]  # the label at each block's centre
    affine = ph.affine_lps().copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag([4.0, 4.0, fz])
    affine[:3, 3] += np.array([1.5 * ph.spacing[2], 1.5 * ph.spacing[1], (fz - 1) / 2 * ph.spacing[0]])
    return np.round(ct).astype(np.int16), labels.astype(np.uint8), _RAS_FROM_LPS @ affine


def write_raw(raw: Path) -> Path:
    """nnU-Net's raw layout: imagesTr/case_XXX_0000.nii.gz, labelsTr/case_XXX.nii.gz, dataset.json."""
    folder = raw / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    regions = ["abdomen"] * 10 + ["chest_abdomen"] * 3 + ["abdomen_pelvis"] * 3
    for i, (seed, region) in enumerate(zip(SEEDS, regions, strict=True)):
        ct, labels, affine = _coarse(seed, region)
        save_nifti(ct.transpose(2, 1, 0), affine, folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        save_nifti(labels.transpose(2, 1, 0), affine, folder / "labelsTr" / f"case_{i:03d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(SEEDS), "file_ending": ".nii.gz",
        "name": "PhantomOrgans", "description": "medseg phantoms (synthetic CT) for the nnU-Net importer's parity tests",
    }, indent=2))
    return folder


def shrink_plans(plans_file: Path) -> None:
    """A small patch and network for CPU training, kept consistent by nnU-Net's own topology rules."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    _, strides, kernels, patch, _ = get_pool_and_conv_props(config["spacing"], list(PATCH), 4, 999999)
    n = len(strides)
    config["architecture"]["arch_kwargs"].update(
        n_stages=n, strides=[[int(v) for v in s] for s in strides], kernel_sizes=[[int(v) for v in k] for k in kernels],
        features_per_stage=list(FEATURES[:n]) + [FEATURES[-1]] * max(0, n - len(FEATURES)),
        n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[1] * (n - 1))
    config["patch_size"] = [int(v) for v in patch]
    config["batch_size"] = 2
    plans["configurations"] = {"3d_fullres": config}
    plans_file.write_text(json.dumps(plans, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=FIXTURE)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=30, help="training iterations per epoch")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medseg-nnunet-") as tmp:
        work = Path(tmp)
        for k in ("raw", "preprocessed", "results"):
            os.environ[f"nnUNet_{k}"] = str(work / k)
        os.environ["nnUNet_n_proc_DA"] = "1"  # the planner sets torch's threads from it (0 would crash it)
        import torch
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset,
            plan_experiment_dataset,
            preprocess_dataset,
        )

        t0 = time.perf_counter()
        write_raw(work / "raw")
        print(f"raw dataset: {len(SEEDS)} phantoms ({time.perf_counter() - t0:.0f} s)", flush=True)
        extract_fingerprint_dataset(DATASET_ID, num_processes=1, check_dataset_integrity=True, clean=True,
                                    verbose=False, show_progress_bar=False)
        plan_experiment_dataset(DATASET_ID)
        pre = work / "preprocessed" / DATASET_NAME
        shrink_plans(pre / "nnUNetPlans.json")
        preprocess_dataset(DATASET_ID, "nnUNetPlans", ["3d_fullres"], [1], verbose=False, show_progress_bar=False)
        print(f"planned and preprocessed ({time.perf_counter() - t0:.0f} s)", flush=True)

        os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: no worker pool on a 2-core machine
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        plans["continue_training"] = False  # the trainer's constructor expects (and removes) it
        trainer = nnUNetTrainer(plans=plans, configuration="3d_fullres", fold=0,
                                dataset_json=json.loads((pre / "dataset.json").read_text()), device=torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = args.epochs, args.iterations, 4
        trainer.run_training()
        print(f"trained {args.epochs} x {args.iterations} iterations ({time.perf_counter() - t0:.0f} s)", flush=True)

        results = work / "results" / DATASET_NAME / TRAINER_FOLDER
        dest = args.out / DATASET_NAME / TRAINER_FOLDER
        shutil.rmtree(args.out / DATASET_NAME, ignore_errors=True)
        (dest / "fold_0").mkdir(parents=True)
        for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            shutil.copy2(results / name, dest / name)
        shutil.copy2(results / "fold_0" / "checkpoint_final.pth", dest / "fold_0" / "checkpoint_final.pth")
        shutil.copy2(results / "fold_0" / "progress.png", dest / "fold_0" / "progress.png")
    (args.out / LABEL_CODES_FILE.name).write_text(json.dumps(LABEL_CODES, indent=2) + "\n")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"wrote {dest} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
