"""Evaluate the exported model as served, in-process, on phantoms never used in training.

    python -m export.evaluate [--seeds 5002 5003 5004 ...]

Per study: liver Dice, tumor Dice, and each true tumor found or missed (by the findings, as a
radiologist would read them). Exits 1 if a liver Dice is below 0.90 or a tumor of 10 mm or more
is missed: the bar the server tests hold the model to.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from medseg.metrics import dice, locate_tumors, match_tumors
from medseg.phantom import generate
from medseg.pipeline import ReferencePipeline
from medseg.spec import SPEC


def evaluate(seeds: list[int]) -> list[dict[str, Any]]:
    """One record per seed: Dice figures and tumor matches."""
    pipe = ReferencePipeline()
    tumor = SPEC.label("liver_tumor").value
    rows = []
    for seed in seeds:
        ph = generate(seed)
        labels, findings = pipe(ph.ct, ph.spacing)
        found = locate_tumors(findings["tumors"], ph.affine_lps())
        matches = match_tumors([t.__dict__ for t in ph.tumors], found)
        row = {"seed": seed, "liver_dice": round(dice(labels > 0, ph.labels > 0), 4),
               "tumor_dice": round(dice(labels == tumor, ph.labels == tumor), 4),
               "true_tumors_mm": [m["diameter_mm"] for m in matches],
               "found": [m["matched_id"] is not None for m in matches],
               "reported_tumors": len(findings["tumors"]),
               "false_positive_ml": sorted((t["volume_ml"] for t in found
                                            if t["id"] not in {m["matched_id"] for m in matches}), reverse=True)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(5002, 5010)))
    rows = evaluate(ap.parse_args(argv).seeds)
    liver = [r["liver_dice"] for r in rows]
    big = [(d, f) for r in rows for d, f in zip(r["true_tumors_mm"], r["found"], strict=True) if d >= 10]
    small = [(d, f) for r in rows for d, f in zip(r["true_tumors_mm"], r["found"], strict=True) if d < 10]
    fps = [v for r in rows for v in r["false_positive_ml"]]
    print(f"liver Dice min {min(liver):.4f} mean {np.mean(liver):.4f}; tumors >= 10 mm found "
          f"{sum(f for _, f in big)}/{len(big)}; tumors < 10 mm found {sum(f for _, f in small)}/{len(small)}; "
          f"false positives {len(fps)} in {len(rows)} studies (median {np.median(fps) if fps else 0:.2f} mL)")
    ok = min(liver) >= 0.90 and all(f for _, f in big)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
