"""Imported models served beside the shipped one, with the labels their own predictors give (server tier).

One repository holds the liver model, the MONAI bundle fixture (tests/fixtures/monai_bundle, MONAI's layout,
``phantom_monai``, with codes) and the nnU-Net v2 fixture (tests/fixtures/nnunet, made by nnU-Net's own
planner and trainer) imported twice: ``phantom_nnunet`` as nnU-Net predicts by default (test-time mirroring on),
with DICOM codes for its labels and its input in RAS (as the real NIfTI file stores it, so nnU-Net's predictor
reading the file sees the same voxels), and ``phantom_nnunet_fast`` without mirroring or codes, in LPS (as the
phantom files store them). `medseg serve` serves
all three; the user's commands (`medseg models`, `medseg segment --model`) run against it, and the labels are
compared with ``nnUNetPredictor`` on the same folder and the same file (the oracle runs here, in the test), and
with MONAI's bundle runner (``python -m monai.bundle run``) on the same bundle and the same files.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.monai_bundle_fixture import BUNDLE
from export.nnunet_fixture import LABEL_CODES, LABEL_CODES_FILE, LABELS, RESULTS_FOLDER
from medseg.importers.monai_bundle import import_monai_bundle
from medseg.importers.nnunet import import_nnunet
from medseg.paths import MODEL_REPOSITORY
from medseg.synth.phantom import generate
from medseg_client.io.studies import _RAS_FROM_LPS, read_nifti, read_study, save_nifti, write_phantom
from tests import realct
from tests.helpers import UNSEEN_SEEDS, ServeProcess, dciodvfy_errors, needs_dciodvfy

pytestmark = pytest.mark.server

ADMIN_KEY = "imported-models-test-key"
PARITY_DICE = 0.99  # per label, served vs the model's own predictor (issue 14)
CODED, FAST, MONAI = "phantom_nnunet", "phantom_nnunet_fast", "phantom_monai"
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    repo = tmp_path_factory.mktemp("repository") / "models"
    shutil.copytree(MODEL_REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    import_nnunet(RESULTS_FOLDER, CODED, repo, label_codes=LABEL_CODES_FILE, orientation="RAS", log=lambda _: None)
    import_nnunet(RESULTS_FOLDER, FAST, repo, mirroring=False, log=lambda _: None)
    import_monai_bundle(BUNDLE, MONAI, repo, label_codes=LABEL_CODES_FILE, log=lambda _: None)
    with ServeProcess("--model-repository", str(repo), env={"MEDSEG_ADMIN_KEY": ADMIN_KEY}) as serve:
        serve.wait_for_line("ready in", timeout_s=300)
        yield serve


@functools.cache
def predictor(mirroring: bool) -> Any:
    """nnU-Net's own predictor on the fixture's results folder, on the CPU."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                        perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(RESULTS_FOLDER), use_folds=("0",), checkpoint_name="checkpoint_final.pth")
    return p


def oracle_nifti(path: Path, mirroring: bool) -> np.ndarray:
    """nnU-Net's labels of a NIfTI file as its predictor reads it (SimpleITK: the file's voxels, (z, y, x))."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image, props = SimpleITKIO().read_images([str(path)])
    return np.asarray(predictor(mirroring).predict_single_npy_array(image, props, None, None, False))


def segment(url: str, model: str, source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medseg_client.cli", "segment", "--url", url, "--model", model,
                           str(source), "--out", str(out)], capture_output=True, text=True, timeout=600)


def served_labels(out: Path) -> np.ndarray:
    """labels.nii.gz in the file's voxel order, as (z, y, x) like SimpleITK reads it."""
    import nibabel as nib

    return np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj).transpose(2, 1, 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def assert_parity(ours: np.ndarray, oracle: np.ndarray, what: str, every_label: bool = True) -> dict[str, float]:
    assert ours.shape == oracle.shape, what
    values = sorted(v for v in LABELS.values() if v)
    present = [v for v in values if (oracle == v).any()]
    if every_label:
        assert present == values, f"{what}: the oracle labels only {present} of {values}: a trivial comparison"
    scores = {v: dice(ours == v, oracle == v) for v in present}
    assert present and min(scores.values()) >= PARITY_DICE, f"{what}: Dice per label {scores}"
    return {str(k): round(v, 4) for k, v in scores.items()}


def test_the_server_lists_its_models(served: ServeProcess) -> None:
    run = subprocess.run([sys.executable, "-m", "medseg_client.cli", "models", "--url", served.url, "--json"],
                         capture_output=True, text=True, timeout=120, env={**_env(), "MEDSEG_ADMIN_KEY": ADMIN_KEY})
    assert run.returncode == 0, run.stderr
    cards = {c["name"]: c for c in json.loads(run.stdout)}
    assert sorted(cards) == sorted(["ct_liver", CODED, FAST, MONAI])
    assert [lab["name"] for lab in cards[MONAI]["labels"]] == list(LABELS) and cards[MONAI]["pipeline"] == "monai"
    assert [lab["name"] for lab in cards[CODED]["labels"]] == list(LABELS)
    assert cards[CODED]["inference"]["mirror_axes"] and not cards[FAST]["inference"]["mirror_axes"]
    assert cards[CODED]["labels"][1]["type"]["value"] == "10200004" and cards[FAST]["labels"][1]["type"] is None
    closed = subprocess.run([sys.executable, "-m", "medseg_client.cli", "models", "--url", served.url],
                            capture_output=True, text=True, timeout=120, env=_env())
    assert closed.returncode == 2 and "admin API" in closed.stderr and "Traceback" not in closed.stderr


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "MEDSEG_ADMIN_KEY"}


# one phantom in the default suite (the real CT and the real DICOM series below are there too), the others in the slow
@pytest.mark.parametrize("seed", [UNSEEN_SEEDS[0], *(pytest.param(s, marks=pytest.mark.slow) for s in UNSEEN_SEEDS[1:])])
def test_phantoms_match_nnunets_predictor(served: ServeProcess, seed: int, tmp_path: Path) -> None:
    """Unseen phantoms (NIfTI, 48 slices at their own spacing) through the fast import vs nnUNetPredictor
    without mirroring: the same labels."""
    ph = generate(seed, num_slices=48)
    write_phantom(ph, tmp_path / "study", "nifti")
    run = segment(served.url, FAST, tmp_path / "study" / "ct.nii.gz", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert_parity(served_labels(tmp_path / "out"), oracle_nifti(tmp_path / "study" / "ct.nii.gz", False), f"seed {seed}")


def test_real_ct_matches_nnunets_predictor_with_mirroring(served: ServeProcess, tmp_path: Path) -> None:
    """TotalSegmentator's real 3 mm abdomen CT through the import as nnU-Net runs it by default (mirroring on)."""
    source = realct.path(realct.CT)
    run = segment(served.url, CODED, source, tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert_parity(served_labels(tmp_path / "out"), oracle_nifti(source, True), "real CT")


@needs_dciodvfy
def test_a_dicom_series_gets_a_valid_seg_only_with_codes(served: ServeProcess, tmp_path: Path) -> None:
    """The real anonymized DICOM series: the coded import writes a SEG dciodvfy accepts, with the labels nnU-Net's
    predictor gives for the same voxels; the uncoded one says why it writes none, and still writes the rest."""
    import pydicom

    source = realct.path(realct.DICOM_SERIES)
    run = segment(served.url, CODED, source, tmp_path / "coded")
    assert run.returncode in (0, 1), run.stderr
    assert dciodvfy_errors(tmp_path / "coded" / "seg.dcm") == []
    seg = pydicom.dcmread(tmp_path / "coded" / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [c["display"] for c in LABEL_CODES.values()]
    study = read_study(source)  # the canonical LPS grid, turned to RAS (x and y flipped) as the model takes it
    ras = np.ascontiguousarray(np.flip(study.ct, (1, 2)))[None].astype(np.float32)
    oracle = np.flip(predictor(True).predict_single_npy_array(ras, {"spacing": list(study.spacing)}, None, None, False),
                     (1, 2))
    assert_parity(served_labels(tmp_path / "coded"), study.to_native(oracle).transpose(2, 1, 0), "real DICOM series",
                  every_label=False)
    run = segment(served.url, FAST, source, tmp_path / "uncoded")
    assert run.returncode in (0, 1), run.stderr
    assert "no seg.dcm" in run.stdout and ", ".join(name for name in LABELS if name != "background") in run.stdout
    assert sorted(p.name for p in (tmp_path / "uncoded").iterdir()) == ["findings.json", "labels.nii.gz", "preview.png"]


def test_the_shipped_model_still_serves_beside_them(served: ServeProcess, tmp_path: Path) -> None:
    ph = generate(UNSEEN_SEEDS[0], num_slices=48)
    write_phantom(ph, tmp_path / "study", "nifti")
    run = segment(served.url, "ct_liver", tmp_path / "study" / "ct.nii.gz", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    labels = served_labels(tmp_path / "out")
    assert dice(labels > 0, ph.labels > 0) > 0.8


# ------------------------------------------------------------------------------------------------ the MONAI bundle


@pytest.fixture(scope="module")
def bundle_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files both sides see: the unseen phantoms (NIfTI, stored LPS), the real CT (stored RAS) and the real
    DICOM series' voxels as medseg reads them (canonical LPS, written as NIfTI); and MONAI's bundle runner's labels
    of each, from one run of ``python -m monai.bundle run`` over them (the bundle's own inference.json)."""
    data = tmp_path_factory.mktemp("bundle_data")
    cases = {}
    for seed in UNSEEN_SEEDS:
        write_phantom(generate(seed, num_slices=48), data / f"s{seed}", "nifti")
        cases[f"seed_{seed}"] = (data / f"s{seed}" / "ct.nii.gz").rename(data / f"seed_{seed}.nii.gz")
        shutil.rmtree(data / f"s{seed}")
    cases["real_ct"] = data / "real_ct.nii.gz"
    shutil.copy(realct.path(realct.CT), cases["real_ct"])
    study = read_study(realct.path(realct.DICOM_SERIES))
    cases["real_dicom"] = data / "real_dicom.nii.gz"
    save_nifti(study.ct.transpose(2, 1, 0), _RAS_FROM_LPS @ study.affine_lps, cases["real_dicom"])
    out = tmp_path_factory.mktemp("bundle_out")
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(BUNDLE / "configs" / "inference.json"), "--bundle_root", str(BUNDLE),
                          "--dataset_dir", str(data), "--output_dir", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return {**cases, **{f"{k}:oracle": out / f"{v.name.removesuffix('.nii.gz')}_seg.nii.gz" for k, v in cases.items()}}


def bundle_oracle(cases: dict[str, Path], key: str) -> np.ndarray:
    """The runner's labels of a case, (z, y, x) in the file's voxel order (as served_labels reads ours)."""
    import nibabel as nib

    return np.asarray(nib.load(str(cases[f"{key}:oracle"])).dataobj).reshape(
        nib.load(str(cases[key])).shape).transpose(2, 1, 0)


@pytest.mark.parametrize("key", [f"seed_{s}" for s in UNSEEN_SEEDS] + ["real_ct"])
def test_cases_match_the_bundle_runner(served: ServeProcess, bundle_cases: dict[str, Path], key: str,
                                       tmp_path: Path) -> None:
    """Unseen phantoms and the real CT through the imported bundle vs MONAI's bundle runner: the same labels,
    every label present in the runner's."""
    run = segment(served.url, MONAI, bundle_cases[key], tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert_parity(served_labels(tmp_path / "out"), bundle_oracle(bundle_cases, key), key)


@needs_dciodvfy
def test_the_bundle_writes_a_valid_seg_for_a_dicom_series(served: ServeProcess, bundle_cases: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """The real anonymized DICOM series: a SEG dciodvfy accepts, coded from the card, and the labels the bundle
    runner gives for the same voxels."""
    import pydicom

    source = realct.path(realct.DICOM_SERIES)
    run = segment(served.url, MONAI, source, tmp_path / "out")
    assert run.returncode in (0, 1), run.stderr
    assert dciodvfy_errors(tmp_path / "out" / "seg.dcm") == []
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm")
    assert {s.SegmentLabel for s in seg.SegmentSequence} <= {c["display"] for c in LABEL_CODES.values()}
    study = read_study(source)
    oracle = read_nifti(bundle_cases["real_dicom:oracle"]).ct  # canonical (z, y, x)
    assert_parity(served_labels(tmp_path / "out"), study.to_native(oracle).transpose(2, 1, 0), "real DICOM series",
                  every_label=False)
