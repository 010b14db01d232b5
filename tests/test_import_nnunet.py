"""`medseg import nnunet` on a real nnU-Net v2 results folder (tests/fixtures/nnunet: made by nnU-Net's own planner
and trainer, ``python -m export.nnunet_fixture``): the card says what the plans say, the model lands in a
repository with configs Triton's schema accepts, and what the pipeline cannot reproduce is refused by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.nnunet_fixture import LABEL_CODES, LABEL_CODES_FILE, RESULTS_FOLDER
from medseg.importers.nnunet import import_nnunet
from medseg_client.card import CARD_FILE, read_card
from medseg_client.errors import ArtifactError
from tests.helpers import assert_gpu_flavors_agree, assert_model_landed


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    import_nnunet(RESULTS_FOLDER, "phantom_nnunet", repo, label_codes=LABEL_CODES_FILE, log=lambda _: None)
    return repo


def test_the_card_is_the_plans(imported: Path) -> None:
    import torch

    plans = json.loads((RESULTS_FOLDER / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    card = read_card(imported / "phantom_nnunet" / CARD_FILE)
    assert card.spacing == tuple(config["spacing"]) and card.transpose == tuple(plans["transpose_forward"])
    assert card.inference.patch == tuple(config["patch_size"]) and card.inference.mode == "sliding_window"
    checkpoint = torch.load(RESULTS_FOLDER / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert card.inference.mirror_axes == tuple(checkpoint["inference_allowed_mirroring_axes"])
    assert (card.normalization.kind, card.normalization.lower, card.normalization.upper) == (
        "ct", stats["percentile_00_5"], stats["percentile_99_5"])
    assert card.normalization.mean == pytest.approx(stats["mean"]) and card.normalization.std == pytest.approx(stats["std"])
    dataset = json.loads((RESULTS_FOLDER / "dataset.json").read_text())
    assert {lab.name: lab.value for lab in card.labels} == dataset["labels"]
    assert card.uncoded() == [] and [lab.display for lab in card.labels[1:]] == [c["display"] for c in LABEL_CODES.values()]
    assert card.labels[3].type is not None and card.labels[3].type.meaning == "Right kidney"
    assert card.source["kind"] == "nnunet-v2" and len(card.source["sha256"]) == 64
    assert card.orientation == "LPS" and card.flips() == ()


def test_the_model_lands_in_the_repository(imported: Path) -> None:
    assert_model_landed(imported, "phantom_nnunet")


def test_the_gpu_flavors_run_the_same_network(imported: Path) -> None:
    assert_gpu_flavors_agree(imported, "phantom_nnunet")


def _variant(tmp_path: Path, edit_plans: dict | None = None, edit_dataset: dict | None = None,
             drop: str | None = None) -> Path:
    folder = tmp_path / RESULTS_FOLDER.name
    shutil.copytree(RESULTS_FOLDER, folder)
    for name, edit in (("plans.json", edit_plans), ("dataset.json", edit_dataset)):
        if edit:
            doc = json.loads((folder / name).read_text())
            for path, value in edit.items():
                *parents, key = path.split("/")
                node = doc
                for p in parents:
                    node = node[p]
                node[key] = value
            (folder / name).write_text(json.dumps(doc))
    if drop:
        (folder / drop).unlink()
    return folder


@pytest.mark.parametrize(("plans", "dataset", "drop", "message"), [
    ({"configurations/3d_fullres/normalization_schemes": ["ZScoreNormalization"]}, None, None,
     "normalization ['ZScoreNormalization'] is not supported"),
    ({"configurations/3d_fullres/resampling_fn_data": "resample_torch_fornnunet"}, None, None,
     "resampling_fn_data 'resample_torch_fornnunet' is not supported"),
    ({"configurations/3d_fullres/previous_stage": "3d_lowres"}, None, None, "is a cascade stage (needs 3d_lowres)"),
    (None, {"labels": {"background": 0, "liver": [1, 2], "spleen": 2}}, None, "region-based labels"),
    (None, {"labels": {"background": 0, "liver": 1, "spleen": 3}}, None, "without gaps"),
    (None, {"channel_names": {"0": "CT", "1": "PET"}}, None, "expected one input channel (CT)"),
    (None, None, "fold_0/checkpoint_final.pth", "missing fold_0/checkpoint_final.pth"),
    (None, None, "plans.json", "holding plans.json"),
])
def test_what_cannot_be_reproduced_is_refused_by_name(tmp_path: Path, plans: dict | None, dataset: dict | None,
                                                      drop: str | None, message: str) -> None:
    folder = _variant(tmp_path, plans, dataset, drop)
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(ArtifactError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        import_nnunet(folder, "refused", repo, log=lambda _: None)
    assert list(repo.iterdir()) == []  # nothing half-written


def test_the_command_refuses_in_one_line(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps({"pancreas": LABEL_CODES["liver"]}))
    cases = [
        (["--name", "ct_liver"], "taken by the shipped liver model"),
        (["--name", "Bad-Name"], "expected lower-case letters"),
        (["--name", "ok", "--label-codes", str(codes)], "no label named pancreas"),
        (["--name", "ok", "--fold", "3"], "missing fold_3/checkpoint_final.pth"),
        (["--name", "ok", "--orientation", "XYZ"], "orientation must be 3 letters"),
    ]
    for extra, message in cases:
        run = subprocess.run([sys.executable, "-m", "medseg_client.cli", "import", "nnunet", str(RESULTS_FOLDER),
                              "--model-repository", str(repo), *extra], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2, (extra, run.stdout, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert list(repo.iterdir()) == []
