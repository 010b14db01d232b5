"""Training pieces: lesion synthesis, scans ending inside the liver, and labels on the model grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.augment import HU_PER_UNIT, LIVER, TUMOR, RandScanEndd, RandSyntheticTumord, end_scan, paint_tumor
from export.data import labels_to_model_grid, scan_end_cases
from medseg.ops.preprocess import PAD_VALUE, pad_to_divisor
from medseg.synth.phantom import generate
from medseg_client.spec import model_grid_shape


def test_a_synthetic_tumor_is_darker_and_labelled_only_inside_the_liver() -> None:
    image = np.full((1, 40, 60, 60), 0.6, np.float32)
    labels = np.zeros((1, 40, 60, 60), np.uint8)
    labels[0, 5:35, 10:50, 10:50] = LIVER
    before = image.copy()
    assert paint_tumor(image, labels, np.random.default_rng(1))
    tumor = labels[0] == TUMOR
    assert tumor.any() and not (tumor & (before[0] != 0.6)).any()
    assert ((labels[0] == TUMOR) <= (labels[0] != 0)).all()
    drop_hu = (before[0][tumor] - image[0][tumor]).mean() * HU_PER_UNIT
    assert 10 < drop_hu < 80
    outside = labels[0] == 0
    assert np.array_equal(image[0][outside], before[0][outside])


def test_no_liver_no_tumor() -> None:
    image = np.zeros((1, 8, 8, 8), np.float32)
    labels = np.zeros((1, 8, 8, 8), np.uint8)
    out = RandSyntheticTumord(prob=1.0)({"image": image, "label": labels})
    assert not (out["label"] == TUMOR).any()


def _liver_patch() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((1, 40, 16, 16), 0.6, np.float32)
    labels = np.zeros((1, 40, 16, 16), np.uint8)
    labels[0, 10:30, 4:12, 4:12] = LIVER
    return image, labels


def test_a_scan_ends_inside_the_liver_with_the_served_padding_past_it() -> None:
    ends = set()
    for seed in range(12):
        image, labels = _liver_patch()
        assert end_scan(image, labels, np.random.default_rng(seed))
        gone = (image[0] == PAD_VALUE).all(axis=(1, 2))
        kept = np.flatnonzero(~gone)
        # one contiguous stretch of slices stays, as it was; the rest is padding with background labels
        assert len(kept) == kept[-1] + 1 - kept[0] and (image[0, kept] == 0.6).all()
        assert not labels[0, gone].any()
        # the cut goes through the liver: some of it is gone, some stays
        liver_kept = np.flatnonzero((labels[0] == LIVER).any(axis=(1, 2)))
        assert 0 < len(liver_kept) < 20
        ends.add("head" if kept[0] > 0 else "feet")
    assert ends == {"head", "feet"}
    assert PAD_VALUE == pad_to_divisor(np.ones((3, 3, 3), np.float32))[-1, -1, -1]


def test_no_liver_no_scan_end_and_prob_zero_changes_nothing() -> None:
    image = np.full((1, 8, 8, 8), 0.6, np.float32)
    labels = np.zeros((1, 8, 8, 8), np.uint8)
    assert not end_scan(image, labels, np.random.default_rng(0)) and (image == 0.6).all()
    patch_image, patch_labels = _liver_patch()
    out = RandScanEndd(prob=0.0)({"image": patch_image, "label": patch_labels})
    assert out["image"] is patch_image and out["label"] is patch_labels


def test_validation_scans_stopped_inside_the_liver_from_each_end() -> None:
    image, labels = _liver_patch()
    empty = (np.zeros_like(image), np.zeros_like(labels))
    cuts = scan_end_cases([(image, labels), empty], kept=0.7)
    # the liver spans slices 10-29: slices 0-15 go (6 of its 20 with them), then slices 24-39
    assert [c[0].shape[1] for c in cuts] == [24, 24]
    assert np.array_equal(cuts[0][1], labels[:, 16:]) and np.array_equal(cuts[1][1], labels[:, :24])
    for cut_image, cut_labels in cuts:
        assert cut_image.shape == cut_labels.shape and (cut_labels[0] == LIVER).any(axis=(1, 2)).sum() == 14


def test_labels_reach_the_model_grid_by_nearest_neighbour() -> None:
    labels = np.zeros((20, 64, 64), np.uint8)
    labels[5:15, 16:48, 16:48] = LIVER
    spacing = (2.5, 0.75, 0.75)
    grid = model_grid_shape(labels.shape, spacing)
    out = labels_to_model_grid(labels, spacing, grid)
    assert out.shape == grid
    vol_in = (labels > 0).sum() * np.prod(spacing)
    vol_out = (out > 0).sum() * 2.0 * 1.5 * 1.5
    assert abs(vol_out - vol_in) / vol_in < 0.15


def test_stored_weights_keep_batch_norm_statistics_in_float32() -> None:
    import torch

    from export.train import stored

    state = {"conv.weight": torch.ones(2, 2), "bn.running_var": torch.tensor([1e6, 3.0]),
             "bn.running_mean": torch.tensor([-2e5, 1.0]), "bn.num_batches_tracked": torch.tensor(7)}
    out = stored(state)
    assert out["conv.weight"].dtype == torch.float16  # weights: half the size
    assert out["bn.running_var"].dtype == torch.float32 and torch.isfinite(out["bn.running_var"]).all()
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and int(out["bn.num_batches_tracked"]) == 7
    assert not torch.isfinite(state["bn.running_var"].half()).all()  # what float16 would have made of it


def test_the_shipped_weights_are_finite_and_fit_the_network() -> None:
    import torch

    from medseg.model.network import WEIGHTS_FILE, build_network

    state = torch.load(WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in state.values() if v.is_floating_point())
    build_network().load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def test_cached_training_cases_are_keyed_by_the_recipe_and_a_recipe_change_misses_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from export import data

    calls: list[tuple[int, ...]] = []

    def preprocessor(ct: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        calls.append(ct.shape)
        return np.zeros((1, 4, 4, 4), np.float32), (4, 4, 4)

    monkeypatch.setattr(data, "CACHE", tmp_path)
    monkeypatch.setattr(data, "generate", lambda seed, region: generate(seed, region=region, num_slices=8,
                                                                        slice_thickness=5.0))
    key = data.recipe_key()
    assert len(key) == 12 and int(key, 16) >= 0
    data.training_case(1000, "abdomen", preprocessor)
    data.training_case(1000, "abdomen", preprocessor)  # from the cache
    assert len(calls) == 1 and [p.name for p in tmp_path.iterdir()] == [f"{key}-seed1000-abdomen.npz"]
    data.recipe_key.cache_clear()
    monkeypatch.setattr(data.inspect, "getsource", lambda obj: "a changed recipe")
    try:
        assert data.recipe_key() != key
        data.training_case(1000, "abdomen", preprocessor)  # a new recipe: built again, not the stale case
        assert len(calls) == 2
    finally:
        data.recipe_key.cache_clear()
