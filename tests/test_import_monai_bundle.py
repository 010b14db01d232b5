"""`medseg import monai-bundle` on a bundle in MONAI's layout (tests/fixtures/monai_bundle: made by
``python -m export.monai_bundle_fixture``): the card says what the bundle's configs say (read by MONAI's own
ConfigParser), the model lands in a repository with its configs, and every transform the pipeline cannot express
is refused by name, with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from export.monai_bundle_fixture import BUNDLE, PIXDIM, ROI, WINDOW
from export.nnunet_fixture import LABEL_CODES_FILE, LABELS
from medseg.importers.monai_bundle import import_monai_bundle, read_bundle
from medseg_client.card import CARD_FILE, read_card
from medseg_client.errors import ArtifactError
from tests.helpers import assert_gpu_flavors_agree, assert_model_landed


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    import_monai_bundle(BUNDLE, "phantom_monai", repo, label_codes=LABEL_CODES_FILE, log=lambda _: None)
    return repo


def test_the_card_is_the_bundle(imported: Path) -> None:
    card = read_card(imported / "phantom_monai" / CARD_FILE)
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert [lab.name for lab in card.labels] == list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values())
    assert [lab.name for lab in card.labels] == list(LABELS) and card.uncoded() == []
    assert (card.pipeline, card.orientation, card.transpose, card.spacing) == ("monai", "RAS", (2, 1, 0), PIXDIM)
    assert sorted(card.flips()) == [1, 2]  # RAS from medseg's LPS grid: x and y reversed
    n = card.normalization
    assert (n.kind, n.lower, n.upper, n.out_lower, n.out_upper, n.clip) == ("scale_range", *WINDOW, 0.0, 1.0, True)
    assert (card.inference.patch, card.inference.step, card.inference.gaussian) == (ROI, 0.5, True)
    assert (card.resampling.data_order, card.resampling.logits_order, card.resampling.softmax) == (1, 1, True)
    assert card.source["kind"] == "monai-bundle" and len(card.source["sha256"]) == 64


def test_the_model_lands_in_the_repository(imported: Path) -> None:
    assert_model_landed(imported, "phantom_monai")


def test_the_gpu_flavors_run_the_same_network(imported: Path) -> None:
    assert_gpu_flavors_agree(imported, "phantom_monai")


def _variant(tmp_path: Path, edit: Any = None, meta: Any = None, drop: str | None = None) -> Path:
    """A copy of the bundle with its inference.json / metadata.json edited in place by the given functions."""
    folder = tmp_path / "bundle"
    shutil.copytree(BUNDLE, folder)
    for name, fn in (("inference.json", edit), ("metadata.json", meta)):
        if fn:
            doc = json.loads((folder / "configs" / name).read_text())
            fn(doc)
            (folder / "configs" / name).write_text(json.dumps(doc))
    if drop:
        (folder / drop).unlink()
    return folder


def _pre(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["preprocessing"]["transforms"]


def _post(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["postprocessing"]["transforms"]


def _named(transforms: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(t for t in transforms if t["_target_"] == name)


REFUSED = [
    (lambda d: _pre(d).insert(4, {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"}), None, None,
     "preprocessing transform CropForegroundd is not supported"),
    (lambda d: _pre(d).pop(2), None, None, "the preprocessing has no Orientationd"),
    (lambda d: _pre(d).insert(3, _pre(d).pop(4)), None, None,
     "preprocessing in the order orientation -> normalization -> spacing is not supported"),
    (lambda d: _named(_pre(d), "Spacingd").update(mode="bicubic"), None, None, "Spacingd mode 'bicubic' is not supported"),
    (lambda d: _pre(d).__setitem__(4, {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True}), None, None,
     "NormalizeIntensityd is supported with one fixed subtrahend"),
    (lambda d: d.__setitem__("inferer", {"_target_": "SimpleInferer"}), None, None,
     "inferer SimpleInferer is not supported"),
    (lambda d: d["inferer"].update(sigma_scale=0.25), None, None,
     "SlidingWindowInferer with per-axis overlaps, sigma_scale"),
    (lambda d: _post(d).insert(3, {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1]}),
     None, None, "postprocessing transform KeepLargestConnectedComponentd is not supported"),
    (lambda d: _named(_post(d), "Activationsd").update(softmax=False, sigmoid=True), None, None,
     "Activationsd other than softmax=True"),
    (lambda d: _post(d).pop(1), None, None, "expected one Invertd"),
    (lambda d: _post(d).insert(1, _post(d).pop(2)), None, None,
     "AsDiscreted(argmax) before Invertd without nearest_interp=True"),
    (None, lambda m: m["network_data_format"]["outputs"]["pred"]["channel_def"].pop("4"), None,
     "must name channels 0..4 (the network gives 5)"),
    (None, lambda m: m["network_data_format"].pop("outputs"), None, "no network_data_format.outputs.pred.channel_def"),
    (lambda d: d["network_def"].update(channels=[8, 16, 32, 64]), None, None, "does not fit the network_def"),
    (None, None, "models/model.pt", "holding models/model.pt"),
    (None, None, "configs/inference.json", "holding configs/inference.json or configs/inference.yaml"),
]


@pytest.mark.parametrize(("edit", "meta", "drop", "message"), REFUSED)
def test_what_cannot_be_expressed_is_refused_by_name(tmp_path: Path, edit: Any, meta: Any, drop: str | None,
                                                     message: str) -> None:
    import re

    folder = _variant(tmp_path, edit, meta, drop)
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(ArtifactError, match=re.escape(message)):
        import_monai_bundle(folder, "refused", repo, log=lambda _: None)
    assert list(repo.iterdir()) == []  # nothing half-written


def test_the_way_back_follows_the_postprocessing(tmp_path: Path) -> None:
    """argmax before Invertd(nearest_interp=True): labels go back, nearest; no softmax: logits go back."""
    def labels_back(d: dict[str, Any]) -> None:
        _post(d).insert(1, _post(d).pop(2))
        _named(_post(d), "Invertd")["nearest_interp"] = True

    card, _ = read_bundle(_variant(tmp_path / "a", labels_back), "a")
    assert (card.resampling.logits_order, card.resampling.softmax) == (0, False)
    card, _ = read_bundle(_variant(tmp_path / "b", lambda d: _post(d).pop(0)), "b")
    assert (card.resampling.logits_order, card.resampling.softmax) == (1, False)


def test_the_command_refuses_in_one_line(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    cases = [
        (str(BUNDLE), ["--name", "ct_liver"], "taken by the shipped liver model"),
        (str(tmp_path / "nowhere"), ["--name", "ok"], "not a folder"),
        (str(_variant(tmp_path, lambda d: _pre(d).insert(4, {"_target_": "RandFlipd", "keys": "image"}))),
         ["--name", "ok"], "preprocessing transform RandFlipd is not supported"),
    ]
    for bundle, extra, message in cases:
        run = subprocess.run([sys.executable, "-m", "medseg_client.cli", "import", "monai-bundle", bundle,
                              "--model-repository", str(repo), *extra], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2, (extra, run.stdout, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert list(repo.iterdir()) == []
