"""The soak (issue 7): the figures from a synthetic record (default suite), and the real 30-minute run at
70% of the measured capacity (slow suite: `make test-slow`; ``MEDSEG_SOAK_MINUTES`` shortens it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medseg.paths import REPO_ROOT
from perf import soak


def _doc(latency_first: float, latency_last: float, rss_end: float, errors: int = 0) -> dict[str, object]:
    reqs = [{"t": float(t), "late_s": 0.0, "ok": True, "error": None,
             "latency_s": latency_first if t < 600 else latency_last} for t in range(0, 1800, 2)]
    for r in reqs[:errors]:
        r["ok"], r["error"] = False, "segmenting: server unavailable"
    memory = [(float(t), 1000.0 if t < 900 else rss_end) for t in range(0, 1810, 10)]
    return {"requests": reqs, "memory_mb": memory, "window_s": 300.0, "capacity_per_s": 1.0, "rate_per_s": 0.7,
            "minutes": 30.0, "load": 0.7, "machine": "2core-test", "date": "2026-11-24"}


@pytest.mark.parametrize(("last", "rss_end", "errors", "held"), [
    (1.1, 1050.0, 0, [True, True, True]), (1.3, 1050.0, 0, [True, True, False]),
    (1.0, 1150.0, 1, [False, False, True]),
])
def test_the_soak_figures_hold_each_limit_or_say_which_not(tmp_path: Path, last: float, rss_end: float, errors: int,
                                                          held: list[bool]) -> None:
    doc = _doc(1.0, last, rss_end, errors)
    doc["figures"] = fig = soak.figures(doc)
    assert fig["errors"] == errors and fig["p99_drift"] == pytest.approx(last - 1.0, abs=1e-3)
    assert fig["rss_growth_mb"] == pytest.approx(rss_end - 1000.0)
    assert list(soak.verdicts(fig).values()) == held
    soak.write(doc, tmp_path)
    md = (tmp_path / "soak.md").read_text()
    assert md.count("| yes |") == sum(held) and md.count("| NO |") == 3 - sum(held)
    assert (tmp_path / "soak.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(3600)
def test_30_minutes_at_70_percent_of_capacity_0_errors_flat_memory_and_latency(tmp_path: Path) -> None:
    minutes = float(os.environ.get("MEDSEG_SOAK_MINUTES", "30"))
    out = REPO_ROOT / "perf" / "results" / "soak" if minutes >= 30 else tmp_path  # only the full run is a result
    code = soak.main(["--minutes", str(minutes), "--load", "0.7", "--out", str(out)])
    md = (out / "soak.md").read_text()
    print(md)
    assert code == 0, md
