"""Agreement measures: Dice of masks, and ground-truth tumors matched to reported findings."""

from __future__ import annotations

from typing import Any

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    inter = int(np.logical_and(pred, truth).sum())
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def match_tumors(truth: list[dict[str, Any]], found: list[dict[str, Any]], margin_mm: float = 5.0) -> list[dict[str, Any]]:
    """For each true tumor (centre_mm LPS, diameter_mm): the id of a reported tumor whose centroid lies
    within its radius plus ``margin_mm``, or None."""
    out = []
    for t in truth:
        c = np.asarray(t["center_mm"], float)
        best, best_d = None, float("inf")
        for f in found:
            d = float(np.linalg.norm(np.asarray(f["centroid_lps_mm"], float) - c))
            if d <= t["diameter_mm"] / 2 + margin_mm and d < best_d:
                best, best_d = f["id"], d
        out.append({"diameter_mm": t["diameter_mm"], "center_mm": t["center_mm"], "matched_id": best,
                    "distance_mm": None if best is None else round(best_d, 1)})
    return out


def locate_tumors(tumors: list[dict[str, Any]], affine_lps: np.ndarray) -> list[dict[str, Any]]:
    """Reported tumors with ``centroid_lps_mm`` added from their (z, y, x) voxel centroid and the
    study's (x, y, z) index -> LPS affine."""
    return [{**t, "centroid_lps_mm": list((affine_lps @ [*t["centroid_voxel_zyx"][::-1], 1.0])[:3])} for t in tumors]
