"""Nothing reported where it cannot be: the study-level judging (anatomy) and the tumor candidates (lesions).

The network is replaced by logits made from a phantom's ground truth (a "perfect" network) or by logits that
claim a liver where there is none, through the segmenter's head (``head``: labels and probabilities), so each rule
is tested on its own, without a model.
"""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest

from export.data import labels_to_model_grid
from medseg.accuracy.metrics import dice
from medseg.ops import anatomy
from medseg.ops.lesions import LIVER, TUMOR, apply_verdicts, judge_candidates
from medseg.ops.postprocess import IMPLAUSIBLE, MOSTLY_OUT, NOT_CT, NOT_IN_VIEW, OK, REGION, head, hu_on_model_grid, postprocess
from medseg.paths import WEIGHTS_DIR
from medseg.synth.phantom import Phantom, generate, noise_volume
from medseg_client.spec import SPEC, model_grid_shape, padded_shape


def _logits(labels_mg: np.ndarray, strength: float = 8.0) -> np.ndarray:
    """Logits of a network certain of ``labels_mg`` (model grid), padded like the segmenter's output."""
    pad = padded_shape(labels_mg.shape)  # type: ignore[arg-type]
    out = np.zeros((SPEC.num_classes, *pad), np.float32)
    for c in range(SPEC.num_classes):
        out[c, : labels_mg.shape[0], : labels_mg.shape[1], : labels_mg.shape[2]] = np.where(labels_mg == c, strength, 0)
    out[LIVER, labels_mg.shape[0] :] = 20.0  # junk in the padding: must be ignored
    return out


def _truth_logits(ph: Phantom) -> tuple[np.ndarray, tuple[int, int, int]]:
    grid = model_grid_shape(ph.ct.shape, ph.spacing)
    return _logits(labels_to_model_grid(ph.labels, ph.spacing, grid)), grid


@pytest.fixture(scope="module")
def abdomen() -> Phantom:
    return generate(5101, num_slices=70, slice_thickness=4.0)


def test_a_perfect_network_on_an_abdomen_is_reported_as_it_is(abdomen: Phantom) -> None:
    logits, grid = _truth_logits(abdomen)
    labels, f = postprocess(*head(logits), grid, abdomen.ct, abdomen.spacing)
    assert f["status"]["code"] == OK and f["status"]["reported"], f["status"]
    assert f["status"]["region"] == "abdomen"
    assert labels.shape == abdomen.ct.shape
    assert dice(labels > 0, abdomen.labels > 0) > 0.95
    assert f["liver"]["found"] and f["liver"]["volume_ml"] > SPEC.plausibility.liver_min_ml
    assert f["status"]["liver"]["right_fraction"] > 0.6
    # every true tumor of 10 mm or more survives the lesion checks, with a confidence
    big = [t for t in abdomen.tumors if t.diameter_mm >= 10]
    assert len(f["tumors"]) >= len(big)
    assert all(0.5 < t["confidence"] <= 1.0 for t in f["tumors"])
    assert f["tumor_operating_point"]["confidence_threshold"] == SPEC.tumor_threshold
    json.dumps(f)  # the document travels as JSON


def test_a_volume_that_is_not_ct_reports_nothing(abdomen: Phantom) -> None:
    logits, grid = _truth_logits(abdomen)
    mr_like = np.clip(abdomen.ct.astype(np.int32) + 1024, 0, 3000).astype(np.int16)  # no air, no fat in "HU"
    labels, f = postprocess(*head(logits), grid, mr_like, abdomen.spacing)
    assert f["status"]["code"] == NOT_CT and not f["status"]["reported"]
    assert "not a CT" in f["status"]["reason"]
    assert not labels.any() and not f["liver"]["found"] and f["tumors"] == []


def test_noise_reports_nothing() -> None:
    ct, spacing = noise_volume(3)
    grid = model_grid_shape(ct.shape, spacing)
    labels, f = postprocess(*head(_logits(np.ones(grid, np.uint8))), grid, ct, spacing)
    assert f["status"]["code"] == NOT_CT and "noise" in f["status"]["reason"] and not labels.any()


@pytest.mark.parametrize("region", ["head", "neck", "legs"])
def test_a_liver_claimed_outside_the_trunk_is_refused_by_region(region: str) -> None:
    ph = generate(5102, region=region, num_slices=40, slice_thickness=5.0)
    grid = model_grid_shape(ph.ct.shape, ph.spacing)
    claim = np.zeros(grid, np.uint8)
    hu = hu_on_model_grid(ph.ct, ph.spacing, grid)
    claim[(hu > 0) & (hu < 100)] = LIVER  # "liver" on every soft-tissue voxel
    labels, f = postprocess(*head(_logits(claim)), grid, ph.ct, ph.spacing)
    assert not f["status"]["reported"] and not labels.any() and f["tumors"] == [], f["status"]
    assert f["status"]["region"] == region
    if region != "neck":  # a neck scan reaches the lungs' apices: refused there for the "liver"'s place, not the region
        assert f["status"]["code"] == REGION and region in f["status"]["reason"], f["status"]


def test_a_liver_claimed_on_the_heart_of_a_chest_scan_is_not_reported() -> None:
    ph = generate(5103, region="chest")
    grid = model_grid_shape(ph.ct.shape, ph.spacing)
    hu = hu_on_model_grid(ph.ct, ph.spacing, grid)
    claim = np.zeros(grid, np.uint8)
    claim[(hu > 60) & (hu < 400)] = LIVER  # heart, vessels, muscle: everything that enhances
    labels, f = postprocess(*head(_logits(claim)), grid, ph.ct, ph.spacing)
    assert not f["status"]["reported"], f["status"]
    assert f["status"]["code"] in (REGION, IMPLAUSIBLE, NOT_IN_VIEW, MOSTLY_OUT)
    assert not labels.any()


def test_a_liver_mostly_outside_the_scan_is_not_reported() -> None:
    ph = generate(5104, region="liver_tip")
    assert 0 < ph.liver_ml < SPEC.plausibility.liver_min_ml
    logits, grid = _truth_logits(ph)
    labels, f = postprocess(*head(logits), grid, ph.ct, ph.spacing)
    assert f["status"]["code"] in (MOSTLY_OUT, NOT_IN_VIEW), f["status"]
    assert not labels.any()


def test_a_liver_filling_the_body_is_implausible(abdomen: Phantom) -> None:
    grid = model_grid_shape(abdomen.ct.shape, abdomen.spacing)
    hu = hu_on_model_grid(abdomen.ct, abdomen.spacing, grid)
    claim = np.where(hu > -300, LIVER, 0).astype(np.uint8)  # the whole body
    labels, f = postprocess(*head(_logits(claim)), grid, abdomen.ct, abdomen.spacing)
    assert f["status"]["code"] == IMPLAUSIBLE and not labels.any(), f["status"]


def test_a_liver_on_the_patients_left_is_implausible(abdomen: Phantom) -> None:
    logits, grid = _truth_logits(abdomen)
    mirrored = logits[:, :, :, : grid[2]][:, :, :, ::-1].copy()  # the liver moved to the patient's left
    logits[:, :, :, : grid[2]] = mirrored
    labels, f = postprocess(*head(logits), grid, abdomen.ct, abdomen.spacing)
    assert not f["status"]["reported"] and not labels.any(), f["status"]


def test_regions_follow_the_body_from_head_to_legs() -> None:
    assert anatomy.REGIONS.index("head") < anatomy.REGIONS.index("chest") < anatomy.REGIONS.index("legs")
    for region, expected in (("head", "head"), ("legs", "legs"), ("chest", "chest"), ("abdomen", "abdomen")):
        ph = generate(5105, region=region, slice_thickness=5.0)
        grid = model_grid_shape(ph.ct.shape, ph.spacing)
        regions = anatomy.scan_regions(hu_on_model_grid(ph.ct, ph.spacing, grid), SPEC.model_spacing)
        assert regions.dominant == expected, (region, regions.summary)
        assert regions.liver_allowed.any() == (expected in ("chest", "abdomen"))


def test_slice_labels_keep_anatomical_order_and_ignore_a_single_misleading_slice() -> None:
    costs = np.zeros((12, len(anatomy.REGIONS)))
    costs[:, :] = 5.0
    costs[6:, anatomy.CHEST] = 0.0  # top half (high z) looks like chest
    costs[:6, anatomy.ABDOMEN] = 0.0  # bottom half like abdomen
    costs[2, :] = 5.0
    costs[2, anatomy.HEAD] = 0.0  # one slice claims head in the middle of the abdomen
    out = anatomy.label_slices(costs, np.ones(12, bool))
    assert list(out[6:]) == [anatomy.CHEST] * 6 and list(out[:6]) == [anatomy.ABDOMEN] * 6


def _organ(shape: tuple[int, int, int] = (40, 80, 80)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block of liver (100 HU) inside fat (-100 HU), a tumor probability map of zeros."""
    labels = np.zeros(shape, np.uint8)
    labels[5:35, 10:70, 10:70] = LIVER
    hu = np.where(labels > 0, 100, -100).astype(np.int16)
    return labels, hu, np.zeros(shape, np.float32)


def test_a_compact_dark_confident_lesion_is_reported() -> None:
    labels, hu, p = _organ()
    z, y, x = np.ogrid[:40, :80, :80]
    ball = ((z - 20) * 2.0) ** 2 + ((y - 40) * 1.5) ** 2 + ((x - 40) * 1.5) ** 2 <= 12.0**2
    labels[ball], hu[ball], p[ball] = TUMOR, 60, 0.95
    comp, cands = judge_candidates(labels, p, hu)
    assert len(cands) == 1 and cands[0].reported and cands[0].confidence == pytest.approx(0.95)
    assert cands[0].contrast_hu == pytest.approx(-40, abs=1)
    assert (apply_verdicts(labels, comp, cands) == TUMOR).sum() == ball.sum()


def test_a_strip_along_the_surface_is_rejected_and_becomes_liver() -> None:
    labels, hu, p = _organ()
    strip = np.zeros_like(labels, bool)
    strip[8:30, 10:12, 15:65] = True  # 2 voxels thick, along the organ's anterior surface
    labels[strip], hu[strip], p[strip] = TUMOR, 40, 0.9
    comp, cands = judge_candidates(labels, p, hu)
    assert len(cands) == 1 and not cands[0].reported and "strip" in (cands[0].reason or "")
    out = apply_verdicts(labels, comp, cands)
    assert not (out == TUMOR).any() and (out[strip] == LIVER).all()


def test_a_lesion_without_contrast_or_confidence_is_rejected() -> None:
    labels, hu, p = _organ()
    z, y, x = np.ogrid[:40, :80, :80]
    a = ((z - 15) * 2.0) ** 2 + ((y - 30) * 1.5) ** 2 + ((x - 30) * 1.5) ** 2 <= 8.0**2
    b = ((z - 25) * 2.0) ** 2 + ((y - 50) * 1.5) ** 2 + ((x - 50) * 1.5) ** 2 <= 8.0**2
    labels[a], hu[a], p[a] = TUMOR, 96, 0.95  # 4 HU darker: nothing to see
    labels[b], hu[b], p[b] = TUMOR, 50, SPEC.tumor_threshold / 2  # visible but the network is unsure
    _, cands = judge_candidates(labels, p, hu)
    reasons = sorted(c.reason or "" for c in cands)
    assert len(cands) == 2 and not any(c.reported for c in cands)
    assert reasons[0].startswith("confidence") and reasons[1].startswith("no visible contrast")


def test_the_spec_threshold_is_the_recorded_operating_point() -> None:
    record = json.loads((WEIGHTS_DIR / "operating_point.json").read_text())
    assert record["tumor_threshold"] == pytest.approx(SPEC.tumor_threshold)
    from medseg.model.network import weights_info

    assert record["weights_sha256"] == weights_info().sha256, "operating point chosen for other weights: rerun export.froc"
    curve = record["curve"]
    assert all(a["threshold"] <= b["threshold"] for a, b in pairwise(curve))
    assert all(a["fp_per_scan"] >= b["fp_per_scan"] for a, b in pairwise(curve))
