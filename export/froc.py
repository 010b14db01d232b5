"""Choose the tumor operating threshold from a FROC curve on held-out phantoms, and record it.

    python -m export.froc [--seeds 3000 ... 3011] [--max-fp-per-scan 0.25]

Runs the exported model in-process (the served steps, same artifacts) on phantoms used neither in training
(1000-1047), validation (2000-2004), nor the evaluation and test seeds (5000+), collects every tumor candidate
that passed the shape and contrast checks with its confidence, and sweeps the threshold: sensitivity for true
tumors of 10 mm and more against false tumors per scan. The operating point is the threshold with the highest
sensitivity whose false tumors per scan stay at or under ``--max-fp-per-scan`` (by default the acceptance bar,
``ACCEPTANCE.false_tumors_per_study``; the highest such threshold among equals). It is written with the whole
curve to ``export/weights/operating_point.json``; the spec's ``tumor_threshold`` must equal it (a test holds them
together), so after a retraining: run this, copy the value into ``medseg_client.spec.Plausibility.tumor_threshold``,
regenerate the configs.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medseg.accuracy.evaluate import passed_checks
from medseg.accuracy.metrics import ACCEPTANCE, BIG, froc, locate_tumors, within_reach
from medseg.model.network import weights_info
from medseg.model.pipeline import ReferencePipeline
from medseg.paths import WEIGHTS_DIR
from medseg.synth.phantom import generate
from medseg_client.spec import SPEC

OPERATING_POINT = WEIGHTS_DIR / "operating_point.json"
FROC_SEEDS = list(range(3000, 3012))
# scans without a liver in view: how confident the network is where a "liver" survives the region checks
NEGATIVE_CASES = [(3100 + i, r) for i, r in enumerate(("chest", "head", "pelvis", "legs", "no_liver", "neck",
                                                        "chest", "pelvis"))]


def collect(pipe: ReferencePipeline, seeds: list[int]) -> list[dict[str, Any]]:
    """Per phantom: its true tumors and the candidates that passed the shape and contrast checks (confidence,
    the true tumors each reaches), in the case shape of ``medseg.accuracy.metrics.froc``."""
    cases = []
    for seed in tqdm(seeds, desc="held-out phantoms", unit="study"):
        ph = generate(seed)
        _, findings = pipe(ph.ct, ph.spacing)
        located = locate_tumors([c for c in findings["tumor_candidates"] if passed_checks(c)], ph.affine_lps())
        truth = [t.__dict__ for t in ph.tumors]
        reach = within_reach(truth, located)
        cases.append({"seed": seed, "truth_mm": [t["diameter_mm"] for t in truth],
                      "liver_confidence": findings["status"].get("liver", {}).get("confidence"),
                      "status": findings["status"]["code"],
                      "candidates": [{"confidence": c["confidence"], "volume_ml": c["volume_ml"],
                                      "matches": [int(i) for i in np.flatnonzero(reach[:, j])]}
                                     for j, c in enumerate(located)]})
    return cases


def negatives_confidence(pipe: ReferencePipeline, cases: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Per scan without a liver in view: its status and, where a "liver" got as far as the confidence check,
    the network's confidence in it (what ``Plausibility.liver_min_confidence`` must stay above)."""
    out = []
    for seed, region in tqdm(cases, desc="scans without a liver", unit="study"):
        ph = generate(seed, region=region)
        _, findings = pipe(ph.ct, ph.spacing)
        out.append({"seed": seed, "region": region, "status": findings["status"]["code"],
                    "liver_confidence": findings["status"].get("liver", {}).get("confidence")})
    return out


def choose(curve: list[dict[str, Any]], max_fp: float) -> dict[str, Any]:
    """The operating point: best sensitivity for tumors >= 10 mm within the false-positive budget, then the
    highest threshold; if no threshold keeps within the budget, the fewest false tumors."""
    ok = [p for p in curve if p["false_per_scan"] <= max_fp]
    if not ok:
        return min(curve, key=lambda p: (p["false_per_scan"], -(p["sensitivity"][BIG] or 0.0)))
    best = max(p["sensitivity"][BIG] or 0.0 for p in ok)
    return max((p for p in ok if (p["sensitivity"][BIG] or 0.0) == best), key=lambda p: p["threshold"])


def plot(curve: list[dict[str, Any]], point: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p["false_per_scan"] for p in curve], [p["sensitivity"][BIG] for p in curve], marker=".")
    ax.scatter([point["false_per_scan"]], [point["sensitivity"][BIG]], color="red", zorder=3,
               label=f"operating point (confidence >= {point['threshold']:.2f})")
    ax.set_xlabel("false tumors per scan")
    ax.set_ylabel("sensitivity, true tumors >= 10 mm")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=FROC_SEEDS)
    ap.add_argument("--max-fp-per-scan", type=float, default=ACCEPTANCE.false_tumors_per_study)
    ap.add_argument("--out", type=Path, default=OPERATING_POINT)
    ap.add_argument("--plot", type=Path, default=None, help="also draw the curve into this PNG")
    args = ap.parse_args(argv)
    pipe = ReferencePipeline()
    cases = collect(pipe, args.seeds)
    curve = froc(cases)
    point = choose(curve, args.max_fp_per_scan)
    confidences = [c["liver_confidence"] for c in cases if c["liver_confidence"] is not None]
    negatives = negatives_confidence(pipe, NEGATIVE_CASES)
    record = {"tumor_threshold": round(point["threshold"], 3), "sensitivity_10mm": point["sensitivity"][BIG],
              "fp_per_scan": round(point["false_per_scan"], 3), "max_fp_per_scan": args.max_fp_per_scan,
              "seeds": args.seeds, "weights_sha256": weights_info().sha256,
              "liver_confidence": {"min": min(confidences, default=None), "median": float(np.median(confidences))
                                   if confidences else None,
                                   "spec_min_confidence": SPEC.plausibility.liver_min_confidence,
                                   "negatives": negatives},
              "statuses": {s: sum(c["status"] == s for c in cases) for s in sorted({c["status"] for c in cases})},
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "curve": [{"threshold": round(p["threshold"], 4), "sensitivity_10mm": p["sensitivity"][BIG],
                         "sensitivity_all": p["sensitivity"]["all"], "fp_per_scan": round(p["false_per_scan"], 4)}
                        for p in sorted(curve, key=lambda p: p["threshold"])]}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    if args.plot:
        plot(curve, point, args.plot)
    print(f"operating point: confidence >= {point['threshold']:.3f}: sensitivity (>= 10 mm) "
          f"{point['sensitivity'][BIG]}, {point['false_per_scan']:.2f} false tumors per scan on {len(cases)} "
          f"phantoms; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
