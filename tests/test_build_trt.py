"""The TensorRT build's pieces that need no GPU: profile from the spec, calibration data, the accuracy gate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from export.build_trt import GATE, accuracy_gate, card_profile, fit_to, main, optimization_profile
from medseg_client.spec import SPEC


def test_the_profile_brackets_the_spec_and_fits_the_network() -> None:
    p = optimization_profile()
    d = SPEC.network.size_divisor
    for shape in (p.min, p.opt, p.max):
        assert shape[:2] == (SPEC.max_batch_size, SPEC.network.in_channels)
        assert all(n % d == 0 for n in shape[2:])
    assert all(a <= b <= c for a, b, c in zip(p.min, p.opt, p.max, strict=True))
    assert all(m >= g for m, g in zip(p.max[2:], SPEC.max_model_grid, strict=True))


def test_calibration_volumes_are_fitted_to_the_opt_shape_around_their_centre() -> None:
    image = np.arange(2 * 10 * 6 * 4, dtype=np.float32).reshape(2, 10, 6, 4)
    out = fit_to(image, (4, 8, 4))
    assert out.shape == (2, 4, 8, 4)
    assert np.array_equal(out[:, :, 1:7, :], image[:, 3:7, :, :])  # z cropped centrally, y padded centrally
    assert not out[:, :, 0].any() and not out[:, :, 7].any()


def _labels(seed: int, flip: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = np.zeros((20, 40, 40), np.uint8)
    ref[2:18, 5:35, 5:35] = 1
    ref[8:12, 15:25, 15:25] = 2
    got = ref.copy()
    edge = np.argwhere(ref == 2)
    n = int(len(edge) * flip)
    for z, y, x in edge[rng.choice(len(edge), n, replace=False)]:
        got[z, y, x] = 1
    return ref, got


def test_the_gate_passes_an_engine_that_agrees_and_refuses_one_that_drifts() -> None:
    assert accuracy_gate([_labels(0, 0.005), _labels(1, 0.0)], "fp16").passed
    drifted = accuracy_gate([_labels(0, 0.0), _labels(1, 0.05)], "fp16")
    assert not drifted.passed and drifted.worst["liver_tumor"] < GATE["fp16"]
    assert "FAILED" in drifted.report()
    assert accuracy_gate([_labels(2, 0.03)], "int8").passed  # ~0.985: inside the INT8 gate, outside FP16's
    assert not accuracy_gate([_labels(2, 0.03)], "fp16").passed


def test_the_gate_refuses_an_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision"):
        accuracy_gate([], "fp8")


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installable here; the engine is built in NVIDIA's TensorRT container")
def test_the_engine_builds_and_passes_its_gate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["--out", str(tmp_path / "model.plan")]) == 0
    assert (tmp_path / "model.plan").stat().st_size > 0


def test_without_tensorrt_the_build_fails_with_a_clear_message(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: the real build is tested instead")
    assert main(["--out", str(tmp_path / "model.plan")]) == 1
    err = capsys.readouterr().err
    assert "TensorRT is not installed here" in err and "docker compose" in err
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MONAI bundle fixture and the nnU-Net fixture (with mirroring) imported into one repository."""
    from export.monai_bundle_fixture import BUNDLE
    from export.nnunet_fixture import RESULTS_FOLDER
    from medseg.importers.monai_bundle import import_monai_bundle
    from medseg.importers.nnunet import import_nnunet

    repo = tmp_path_factory.mktemp("repo")
    import_monai_bundle(BUNDLE, "bundle", repo, log=lambda _: None)
    import_nnunet(RESULTS_FOLDER, "nnunet", repo, log=lambda _: None)
    return repo


def test_an_imported_models_profile_is_its_tile_and_its_windows_batch(imported: Path) -> None:
    from medseg_client.card import CARD_FILE, read_card

    for name, batch in (("bundle", 4), ("nnunet", 8)):  # MONAI's tile batch; a tile and its 7 mirrored copies
        card = read_card(imported / name / CARD_FILE)
        p = card_profile(card)
        tile = (card.in_channels, *card.inference.patch)
        assert (p.min, p.opt, p.max) == ((1, *tile), (batch, *tile), (batch, *tile))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installable here; the engine is built in NVIDIA's TensorRT container")
def test_an_imported_models_engine_builds_and_passes_its_gate(imported: Path) -> None:
    assert main(["--card", str(imported / "bundle")]) == 0
    assert (imported / "bundle_segmenter" / "1" / "model.plan").stat().st_size > 0


def test_an_imported_models_build_refuses_clearly(imported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted((imported / "bundle_segmenter" / "1").iterdir())
    assert main(["--card", str(imported / "bundle"), "--precision", "int8"]) == 1
    assert "INT8 calibration data exists for the shipped model only" in capsys.readouterr().err
    if importlib.util.find_spec("tensorrt") is None:
        assert main(["--card", str(imported / "bundle")]) == 1
        assert "TensorRT is not installed here" in capsys.readouterr().err
    assert sorted((imported / "bundle_segmenter" / "1").iterdir()) == before  # nothing half-written
