"""Agreement measures: Dice of masks, ground-truth tumors matched to reported findings, FROC points.

A true tumor counts as found by a reported tumor (or a candidate) whose centroid lies within the true tumor's
radius plus a margin (5 mm): the rule applies alike to reported tumors and to candidates, which carry only
their centroids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MARGIN_MM = 5.0


@dataclass(frozen=True)
class Acceptance:
    """The bars the shipped model is held to on unseen phantoms (tests, the demo, the evaluation report)."""

    liver_dice: float = 0.93  # every study
    big_tumor_mm: float = 10.0
    big_tumor_sensitivity: float = 0.95  # of the true tumors of big_tumor_mm or more, found
    false_tumors_per_study: float = 0.25


ACCEPTANCE = Acceptance()
# two implementations of the same model (flavors, engines, served vs in-process) agree at least this well per label
AGREEMENT_DICE = 0.99
BIG = f"ge_{ACCEPTANCE.big_tumor_mm:g}mm"  # the key of the tumors the sensitivity bar is about, wherever sizes are keyed
# named ranges of true tumor diameters (mm) whose sensitivity a FROC point reports: [low, high)
FROC_SIZES: dict[str, tuple[float, float]] = {BIG: (ACCEPTANCE.big_tumor_mm, float("inf")), "all": (0.0, float("inf"))}


def dice(pred: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Dice of two boolean masks, leaving out the voxels where ``ignore`` is True; 1.0 when both are empty."""
    if ignore is not None:
        keep = ~np.asarray(ignore, bool)
        pred, truth = np.logical_and(pred, keep), np.logical_and(truth, keep)
    inter = int(np.logical_and(pred, truth).sum())
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    return 1.0 if total == 0 else 2.0 * inter / total


def tumor_distances(truth: list[dict[str, Any]], found: list[dict[str, Any]]) -> np.ndarray:
    """(true, found) distances in mm between true tumors' ``center_mm`` and found ones' ``centroid_lps_mm``."""
    if not truth or not found:
        return np.zeros((len(truth), len(found)))
    t = np.asarray([x["center_mm"] for x in truth], float)
    f = np.asarray([x["centroid_lps_mm"] for x in found], float)
    return np.asarray(np.linalg.norm(t[:, None, :] - f[None, :, :], axis=-1))


def within_reach(truth: list[dict[str, Any]], found: list[dict[str, Any]], margin_mm: float = MARGIN_MM) -> np.ndarray:
    """(true, found) booleans: the found centroid lies within the true tumor's radius (``diameter_mm`` / 2) plus
    ``margin_mm``."""
    radius = np.asarray([x["diameter_mm"] / 2 + margin_mm for x in truth], float).reshape(-1, 1)
    return np.asarray(tumor_distances(truth, found) <= radius)


def match_tumors(truth: list[dict[str, Any]], found: list[dict[str, Any]], margin_mm: float = MARGIN_MM) -> list[dict[str, Any]]:
    """For each true tumor (centre_mm LPS, diameter_mm): the id of the nearest reported tumor whose centroid lies
    within its radius plus ``margin_mm``, or None."""
    dist, reach = tumor_distances(truth, found), within_reach(truth, found, margin_mm)
    out = []
    for i, t in enumerate(truth):
        best, best_d = None, float("inf")
        for j, f in enumerate(found):
            if reach[i, j] and dist[i, j] < best_d:
                best, best_d = f["id"], float(dist[i, j])
        out.append({"diameter_mm": t["diameter_mm"], "center_mm": t["center_mm"], "matched_id": best,
                    "distance_mm": None if best is None else round(best_d, 1)})
    return out


def locate_tumors(tumors: list[dict[str, Any]], affine_lps: np.ndarray) -> list[dict[str, Any]]:
    """Reported tumors with ``centroid_lps_mm`` added from their (z, y, x) voxel centroid and the
    study's (x, y, z) index -> LPS affine."""
    return [{**t, "centroid_lps_mm": list((affine_lps @ [*t["centroid_voxel_zyx"][::-1], 1.0])[:3])} for t in tumors]


def froc_point(cases: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool],
               sizes: Mapping[str, tuple[float, float]] = FROC_SIZES) -> dict[str, Any]:
    """Sensitivity per size range and false tumors per scan when the candidates ``keep`` accepts are reported.

    ``cases``: one per scan, ``{"truth_mm": [true tumor diameters], "candidates": [{"confidence", "matches":
    [indices into truth_mm], "false": bool (optional; default: no matches)}]}``. A true tumor is found when a
    kept candidate matches it; a kept candidate counts as false when its ``false`` says so. Sensitivity is None
    where a range holds no true tumor."""
    found = dict.fromkeys(sizes, 0)
    total = dict.fromkeys(sizes, 0)
    false = 0
    for case in cases:
        kept = [c for c in case["candidates"] if keep(c)]
        hit = {i for c in kept for i in c["matches"]}
        false += sum(1 for c in kept if c.get("false", not c["matches"]))
        for name, (lo, hi) in sizes.items():
            inside = [i for i, d in enumerate(case["truth_mm"]) if lo <= d < hi]
            total[name] += len(inside)
            found[name] += sum(1 for i in inside if i in hit)
    return {"sensitivity": {k: (found[k] / total[k] if total[k] else None) for k in sizes},
            "found": found, "total": total, "false_per_scan": false / len(cases) if cases else None}


def froc(cases: list[dict[str, Any]], sizes: Mapping[str, tuple[float, float]] = FROC_SIZES) -> list[dict[str, Any]]:
    """The FROC curve: ``froc_point`` at every distinct candidate confidence as the threshold (candidates at or
    above it reported), highest threshold first, plus one above them all (nothing reported)."""
    thresholds = sorted({float(c["confidence"]) for case in cases for c in case["candidates"]}, reverse=True)
    above = (thresholds[0] if thresholds else 1.0) + 0.01

    def at(threshold: float) -> Callable[[dict[str, Any]], bool]:
        return lambda c: float(c["confidence"]) >= threshold

    return [{"threshold": t, **froc_point(cases, at(t), sizes)} for t in [above, *thresholds]]
