"""Postprocessing: components, labels back on the study grid, and lesion measurements."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.ops.postprocess import (
    LIVER,
    TUMOR,
    head,
    keep_liver_and_its_tumors,
    longest_axial_diameter,
    measure,
    model_grid_labels,
    postprocess,
    to_input_grid,
)
from medseg_client.spec import SPEC, model_grid_shape


def _ball(shape: tuple[int, int, int], centre: tuple[float, ...], radius: float, spacing: tuple[float, ...]) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=np.float64)
    d2 = ((z - centre[0]) * spacing[0]) ** 2 + ((y - centre[1]) * spacing[1]) ** 2 + ((x - centre[2]) * spacing[2]) ** 2
    return d2 <= radius**2


def test_keeps_the_largest_liver_and_tumors_touching_it_only() -> None:
    lab = np.zeros((20, 40, 40), np.uint8)
    lab[2:15, 5:30, 5:30] = LIVER
    lab[5:8, 10:14, 10:14] = TUMOR  # inside the liver
    lab[5:8, 29:33, 20:24] = TUMOR  # touching the liver's edge
    lab[16:19, 35:39, 35:39] = TUMOR  # floating away from it
    lab[17:19, 2:4, 36:39] = LIVER  # a small second "liver"
    out = keep_liver_and_its_tumors(lab)
    assert (out[5:8, 10:14, 10:14] == TUMOR).all()
    assert (out[5:8, 29:33, 20:24] == TUMOR).all()
    assert not out[16:, 35:, 35:].any()
    assert not out[17:19, 2:4, 36:39].any()


def test_empty_prediction_gives_no_liver() -> None:
    out = keep_liver_and_its_tumors(np.zeros((4, 4, 4), np.uint8))
    assert not out.any()
    f = measure(out, np.zeros((4, 4, 4), np.int16), (1.0, 1.0, 1.0))
    assert f["liver"]["found"] is False and f["tumors"] == []


def test_labels_come_back_on_the_input_grid_in_the_right_place() -> None:
    shape, spacing = (60, 200, 180), (2.5, 0.7, 0.8)
    truth = _ball(shape, (30, 90, 100), 30.0, spacing)
    grid = model_grid_shape(shape, spacing)
    gz, gy, gx = (np.arange(n) for n in grid)
    # the same ball drawn on the centred model grid
    off = [(n * s - g * m) / 2 for n, s, g, m in zip(shape, spacing, grid, SPEC.model_spacing, strict=True)]
    cz, cy, cx = ((c + 0.5) * s for c, s in zip((30, 90, 100), spacing, strict=True))
    d2 = (((gz[:, None, None] + 0.5) * 2.0 + off[0] - cz) ** 2 + ((gy[None, :, None] + 0.5) * 1.5 + off[1] - cy) ** 2
          + ((gx[None, None, :] + 0.5) * 1.5 + off[2] - cx) ** 2)
    model_labels = (d2 <= 30.0**2).astype(np.uint8)
    back = to_input_grid(model_labels, shape, spacing)
    assert back.shape == shape
    inter = np.logical_and(back > 0, truth).sum()
    assert 2 * inter / (back.astype(bool).sum() + truth.sum()) > 0.95


def test_longest_axial_diameter_of_a_disk_is_its_diameter() -> None:
    spacing = (2.0, 0.5, 0.5)
    mask = _ball((9, 120, 120), (4, 60, 60), 20.0, spacing)
    assert longest_axial_diameter(mask, spacing) == pytest.approx(40.0, abs=1.5)


def test_measures_tumor_volume_diameter_centroid_and_mean_hu() -> None:
    spacing = (1.0, 1.0, 1.0)
    shape = (60, 80, 80)
    labels = np.zeros(shape, np.uint8)
    labels[5:55, 5:75, 5:75] = LIVER
    tumor = _ball(shape, (30, 40, 40), 10.0, spacing)
    labels[tumor] = TUMOR
    small = _ball(shape, (15, 15, 15), 3.0, spacing)
    labels[small] = TUMOR
    ct = np.full(shape, 100, np.int16)
    ct[tumor] = 40
    f = measure(labels, ct, spacing)
    assert f["liver"]["volume_ml"] == pytest.approx(50 * 70 * 70 / 1000, rel=1e-6)
    big = f["tumors"][0]
    assert big["id"] == 1 and len(f["tumors"]) == 2
    assert big["volume_ml"] == pytest.approx(4 / 3 * np.pi * 10**3 / 1000, rel=0.05)
    assert big["longest_axial_diameter_mm"] == pytest.approx(21.0, abs=1.5)
    assert big["centroid_voxel_zyx"] == pytest.approx([30, 40, 40], abs=0.01)
    assert big["mean_hu"] == pytest.approx(40.0)
    assert big["bbox_voxel_zyx"]["start"] == [20, 30, 30] and big["bbox_voxel_zyx"]["stop"] == [41, 51, 51]


def test_postprocess_reports_the_grids_and_a_status_even_when_nothing_is_reported() -> None:
    shape, spacing = (20, 40, 40), (2.0, 1.5, 1.5)
    logits = np.zeros((SPEC.num_classes, 32, 48, 48), np.float32)
    logits[0] = 1.0
    logits[1, 4:12, 10:30, 10:30] = 5.0
    labels, findings = postprocess(*head(logits), (20, 40, 40), np.zeros(shape, np.int16), spacing)
    assert labels.shape == shape and not labels.any()  # a uniform volume is no CT: nothing is reported
    assert findings["status"]["code"] == "not_ct" and findings["status"]["reason"]
    assert findings["model_grid_zyx"] == [20, 40, 40]
    assert findings["study_grid"] == {"shape_zyx": list(shape), "spacing_zyx_mm": list(spacing)}
    assert findings["liver"] == {"found": False, "volume_ml": 0.0} and findings["tumors"] == []


def test_segmenter_outputs_of_the_wrong_shape_are_refused() -> None:
    labels, probabilities = np.zeros((4, 4, 4), np.uint8), np.zeros((2, 4, 4, 4), np.float16)
    with pytest.raises(ValueError, match=r"probabilities \(2, z, y, x\)"):
        model_grid_labels(labels, np.zeros((3, 4, 4, 4), np.float16), (4, 4, 4))
    with pytest.raises(ValueError, match="differs from the labels'"):
        model_grid_labels(labels, np.zeros((2, 4, 4, 8), np.float16), (4, 4, 4))
    with pytest.raises(ValueError, match="exceeds"):
        model_grid_labels(labels, probabilities, (8, 4, 4))
    assert model_grid_labels(labels, probabilities, (2, 3, 4)).shape == (2, 3, 4)


def test_a_speckled_prediction_lists_only_the_largest_tumors_quickly() -> None:
    rng = np.random.default_rng(3)
    labels = np.full((40, 120, 120), LIVER, np.uint8)
    labels[rng.random(labels.shape) < 0.02] = TUMOR  # thousands of specks
    labels[10:20, 10:30, 10:30] = TUMOR
    f = measure(labels, np.zeros(labels.shape, np.int16), (2.0, 1.0, 1.0))
    assert len(f["tumors"]) <= SPEC.max_reported_tumors
    assert f["tumors"][0]["volume_ml"] >= f["tumors"][-1]["volume_ml"]
    assert f["tumors"][0]["bbox_voxel_zyx"]["start"][0] <= 10
    assert f["tumor_burden_ml"] >= sum(t["volume_ml"] for t in f["tumors"]) - 1e-6


def test_preview_shows_an_axial_panel_per_tumor_and_a_coronal_panel() -> None:
    from medseg_client.io.preview import PANEL, render_preview

    shape, spacing = (40, 100, 120), (2.5, 0.8, 0.8)
    ct = np.zeros(shape, np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[10:30, 20:80, 20:100] = LIVER
    labels[15:20, 40:50, 40:50] = TUMOR
    labels[25:28, 60:66, 70:76] = TUMOR
    f = measure(labels, ct, spacing)
    img = render_preview(ct, labels, spacing, f)
    assert img.width == PANEL * (len(f["tumors"]) + 1) and len(f["tumors"]) == 2
    pixels = np.asarray(img)
    assert (pixels[..., 0] > 200).any() and (pixels[..., 1] > 150).any()  # overlay colours are drawn


def test_the_heads_labels_are_the_argmax_ties_included_and_its_probabilities_the_softmax() -> None:
    rng = np.random.default_rng(3)
    logits = rng.integers(-2, 3, size=(3, 10, 12, 14)).astype(np.float32)  # many ties
    labels, probabilities = head(logits)
    assert labels.dtype == np.uint8 and probabilities.dtype == np.float16 and probabilities.shape == (2, 10, 12, 14)
    assert np.array_equal(labels, np.argmax(logits, axis=0))
    softmax = np.exp(logits) / np.exp(logits).sum(axis=0)
    np.testing.assert_allclose(probabilities[0], softmax[TUMOR], atol=5e-4)  # float16: 3 significant digits
    np.testing.assert_allclose(probabilities[1], softmax.max(axis=0), atol=5e-4)


def test_the_torch_head_equals_the_numpy_statement_of_it() -> None:
    import torch

    from medseg.model.head import LabelsAndProbabilities

    logits = np.random.default_rng(4).normal(0, 3, size=(2, 3, 6, 8, 10)).astype(np.float32)
    logits[:, 1, 0] = logits[:, 0, 0]  # ties go to the lower class in both
    net = LabelsAndProbabilities(torch.nn.Identity())
    labels, probabilities = (o.numpy() for o in net(torch.from_numpy(logits)))
    want = head(logits)
    assert np.array_equal(labels, want[0])
    np.testing.assert_allclose(probabilities.astype(np.float32), want[1].astype(np.float32), atol=1e-3)


def test_bounding_box_equals_find_objects() -> None:
    from scipy import ndimage

    from medseg.ops.postprocess import bounding_box

    rng = np.random.default_rng(4)
    for _ in range(5):
        mask = np.zeros((20, 30, 40), bool)
        for _ in range(3):
            z, y, x = rng.integers(0, 18), rng.integers(0, 28), rng.integers(0, 38)
            mask[z : z + 2, y : y + 2, x : x + 2] = True
        assert bounding_box(mask) == ndimage.find_objects(mask.astype(np.uint8))[0]


def test_labelled_box_is_the_box_of_any_nonzero_label_or_none() -> None:
    from scipy import ndimage

    from medseg.ops.postprocess import labelled_box

    rng = np.random.default_rng(5)
    labels = np.zeros((20, 30, 40), np.uint8)
    assert labelled_box(labels) is None
    for _ in range(5):
        labels[:] = 0
        for value in (1, 2):
            z, y, x = rng.integers(0, 18), rng.integers(0, 28), rng.integers(0, 38)
            labels[z : z + 2, y : y + 2, x : x + 2] = value
        assert labelled_box(labels) == ndimage.find_objects((labels > 0).astype(np.uint8))[0]
        assert labelled_box(labels == 2) == ndimage.find_objects((labels == 2).astype(np.uint8))[0]


def test_label_findings_measure_each_class_inside_its_own_box_as_on_the_whole_study() -> None:
    """An imported model's findings: volume, 26-connected components and mean HU per class, each measured inside
    the class's box, equal to counting over the whole study (a class the model did not label is reported empty)."""
    from scipy import ndimage

    from medseg.ops.postprocess import label_findings
    from medseg_client.spec import Label

    rng = np.random.default_rng(6)
    labels = np.zeros((30, 40, 50), np.uint8)
    for value, blobs in ((1, 3), (3, 1)):
        for _ in range(blobs):
            z, y, x = rng.integers(0, 26), rng.integers(0, 36), rng.integers(0, 46)
            labels[z : z + 3, y : y + 4, x : x + 3] = value
    ct = rng.integers(-200, 300, size=labels.shape).astype(np.int16)
    classes = [Label(v, n, n, (0, 0, 0)) for v, n in ((0, "background"), (1, "a"), (2, "b"), (3, "c"))]
    got = {c["name"]: c for c in label_findings(labels, ct, (2.0, 1.0, 1.0), classes)["labels"]}
    for value, name in ((1, "a"), (2, "b"), (3, "c")):
        mask = labels == value
        assert got[name]["voxels"] == int(mask.sum()) and got[name]["volume_ml"] == round(mask.sum() * 0.002, 2)
        assert got[name]["components"] == (ndimage.label(mask, np.ones((3, 3, 3)))[1] if mask.any() else 0)
        assert got[name]["mean_hu"] == (round(float(ct[mask].mean()), 1) if mask.any() else None)
    assert got["b"]["voxels"] == 0 and got["a"]["voxels"] > 0
