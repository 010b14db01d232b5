"""Accuracy and honesty through the real server: unseen phantoms, scans that hold no liver, real CT.

- 8 phantom seeds never used in training, validation or the operating point's choice: every liver Dice at
  the bar, tumors of 10 mm and more found at the bar, few false tumors per study;
- head, neck, chest-only, pelvis and leg phantoms, an abdomen without a liver, a scan holding only the
  liver's tip, a noise volume and an MR volume: no liver and no tumor reported, a status with the reason;
- TotalSegmentator's real CT (``make realct``; development and acceptance data, never training data): the
  liver Dice at the bar against its liver label on both example CTs, under 1 mL of tumor on the DICOM series.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from medseg.accuracy.metrics import ACCEPTANCE, dice, locate_tumors, match_tumors
from medseg.synth.phantom import generate, noise_volume
from medseg_client.client import SegmentationClient
from tests.helpers import EVAL_SEEDS, LIVER_DICE_FLOOR, NEGATIVES

pytestmark = pytest.mark.server

# Where the shipped model stands below a bar (measured by `make accuracy`, perf/results/<machine>/accuracy/), the
# bar's test is a strict xfail naming the measured figure, and a floor just under today's figure is asserted so
# that a regression still fails. Issue 12 stays open until these xfails pass (strict: an XPASS fails the suite).
REAL_LIVER_DICE_FLOOR = 0.82  # example_ct 0.848, example_ct_dicom 0.838
TUMOR_SENSITIVITY_FLOOR = 0.40  # tumors >= 10 mm found on 5002-5009
BELOW_THE_BAR = "the shipped model is below this acceptance bar (issue 12; measured figure in the README's accuracy table)"


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    with SegmentationClient(server.grpc_url) as c:
        c.wait_until_ready(60)
        yield c


@pytest.mark.parametrize("seed", EVAL_SEEDS)
def test_liver_dice_on_an_unseen_phantom_stays_above_its_floor(seed: int, served_unseen: dict) -> None:  # type: ignore[type-arg]
    ph, result = served_unseen[seed]
    assert result.findings["status"]["code"] == "ok", result.findings["status"]
    assert dice(result.labels > 0, ph.labels > 0) >= LIVER_DICE_FLOOR


@pytest.mark.xfail(strict=True, reason=BELOW_THE_BAR + ": min liver Dice 0.908 (seed 5004) < 0.93")
def test_liver_dice_on_every_unseen_phantom_reaches_the_bar(served_unseen: dict) -> None:  # type: ignore[type-arg]
    scores = {seed: dice(result.labels > 0, ph.labels > 0) for seed, (ph, result) in served_unseen.items()}
    assert min(scores.values()) >= ACCEPTANCE.liver_dice, scores


def _tumor_tally(served_unseen: dict) -> tuple[int, int, int]:  # type: ignore[type-arg]
    """True tumors of 10 mm and more, how many of them were found, and reported tumors matching no true one."""
    big = found = false = 0
    for ph, result in served_unseen.values():
        reported = locate_tumors(result.findings["tumors"], ph.affine_lps())
        matches = match_tumors([t.__dict__ for t in ph.tumors], reported)
        big += sum(1 for m in matches if m["diameter_mm"] >= ACCEPTANCE.big_tumor_mm)
        found += sum(1 for m in matches if m["diameter_mm"] >= ACCEPTANCE.big_tumor_mm and m["matched_id"] is not None)
        matched = {m["matched_id"] for m in matches if m["matched_id"] is not None}
        false += sum(1 for t in reported if t["id"] not in matched)
        assert all(0.0 <= t["confidence"] <= 1.0 for t in result.findings["tumors"])
    return big, found, false


def test_false_tumors_are_rare_and_tumors_found_above_the_floor_over_the_unseen_phantoms(served_unseen: dict) -> None:  # type: ignore[type-arg]
    big, found, false = _tumor_tally(served_unseen)
    assert big >= 8, "the unseen phantoms must hold enough tumors to judge"
    assert false / len(served_unseen) <= ACCEPTANCE.false_tumors_per_study, f"{false} false tumors in {len(served_unseen)} studies"
    assert found / big >= TUMOR_SENSITIVITY_FLOOR, f"{found} of {big} tumors >= 10 mm found"


@pytest.mark.xfail(strict=True, reason=BELOW_THE_BAR + ": half of the tumors >= 10 mm found (6 of 12), the bar is 95%")
def test_tumors_of_10_mm_and_more_are_found_at_the_bar(served_unseen: dict) -> None:  # type: ignore[type-arg]
    big, found, _ = _tumor_tally(served_unseen)
    assert found / big >= ACCEPTANCE.big_tumor_sensitivity, f"{found} of {big} tumors >= 10 mm found"




@pytest.mark.parametrize("region", NEGATIVES)
def test_a_scan_without_a_liver_in_view_reports_none(region: str, client: SegmentationClient) -> None:
    ph = generate(6000 + NEGATIVES.index(region), region=region)
    result = client.segment(ph.ct, ph.spacing)
    status = result.findings["status"]
    assert not status["reported"] and status["code"] != "ok" and status["reason"], status
    assert not result.labels.any() and result.findings["tumors"] == [] and not result.findings["liver"]["found"]


def test_a_noise_volume_reports_none(client: SegmentationClient) -> None:
    ct, spacing = noise_volume(6100)
    result = client.segment(ct, spacing)
    assert result.findings["status"]["code"] == "not_ct" and not result.labels.any()


def test_real_mr_is_refused_as_not_ct(client: SegmentationClient, realct: Any) -> None:
    from medseg_client.io.studies import read_study

    study = read_study(realct.mr)
    result = client.segment(study.ct, study.spacing)
    assert result.findings["status"]["code"] == "not_ct" and not result.labels.any()


@pytest.fixture(scope="module")
def real_dicom(client: SegmentationClient, realct: Any) -> tuple[Any, float]:
    """The real DICOM series served once: its result and its liver Dice against TotalSegmentator's liver."""
    from medseg_client.io.studies import read_study

    study = read_study(realct.dicom_series)
    result = client.segment(study.ct, study.spacing)
    liver = realct.truth_on_canonical_grid(study, realct.dicom_labels) == realct.liver_label
    return result, dice(result.labels > 0, liver)


@pytest.fixture(scope="module")
def real_nifti(client: SegmentationClient, realct: Any) -> tuple[Any, float]:
    """The real 3 mm CT served once: its result and its liver Dice over the labelled top slices."""
    from medseg_client.io.studies import read_study

    study = read_study(realct.nifti_ct)
    result = client.segment(study.ct, study.spacing)
    top = realct.labelled_top_slices  # its labels cover only its top slices
    liver = realct.top_labels_on_canonical_grid(study) == realct.liver_label
    return result, dice(result.labels[-top:] > 0, liver)


def test_the_real_dicom_series_reports_its_liver_without_false_tumors(real_dicom: tuple[Any, float]) -> None:
    result, liver_dice = real_dicom
    assert result.findings["status"]["code"] == "ok", result.findings["status"]
    assert liver_dice >= REAL_LIVER_DICE_FLOOR
    assert result.findings["tumor_burden_ml"] < 1.0, result.findings["tumors"]


def test_the_real_abdominal_ct_reports_its_liver(real_nifti: tuple[Any, float]) -> None:
    result, liver_dice = real_nifti
    assert result.findings["status"]["code"] == "ok", result.findings["status"]
    assert liver_dice >= REAL_LIVER_DICE_FLOOR
    assert np.isfinite(result.findings["liver"]["volume_ml"])


@pytest.mark.xfail(strict=True, reason=BELOW_THE_BAR + ": real liver Dice 0.838 (DICOM) and 0.848 (3 mm NIfTI) < 0.93")
def test_the_real_livers_reach_the_bar(real_dicom: tuple[Any, float], real_nifti: tuple[Any, float]) -> None:
    assert min(real_dicom[1], real_nifti[1]) >= ACCEPTANCE.liver_dice, (real_dicom[1], real_nifti[1])
