"""The soak: the served cpu flavor held at a share of its measured capacity for a long time.

    python -m perf.soak [--minutes 30] [--load 0.7] [--out perf/results/soak]

First the capacity is measured on this machine (volumes/s of the soak study with as many requests in
flight as there are cores), then studies arrive at ``load`` x capacity, evenly spaced (open loop: a
late answer does not slow the arrivals), for ``minutes``. Recorded: every request's latency and outcome,
and the resident memory of the server with its model processes every 10 s. Figures: errors, the growth of
memory between the first and the last window (their medians: a study in flight swings it by its
buffers), and the drift of p99 latency between the same windows. Written to ``<out>/``: soak.json, soak.md and soak.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medseg.paths import REPO_ROOT
from medseg.serving.server import EmbeddedServer, ServerOptions
from medseg.synth.phantom import generate
from medseg_client.client import SegmentationClient
from medseg_client.errors import MedsegError

SEED, SLICES, SLICE_MM = 5102, 48, 2.5  # a short abdominal study: many requests in half an hour
LIMITS = {"errors": 0, "rss_growth_mb": 100.0, "p99_drift": 0.20}


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def capacity(url: str, ph: Any, in_flight: int, seconds: float = 40.0) -> float:
    """Volumes per second with ``in_flight`` requests kept in flight for ``seconds`` (closed loop)."""
    done: list[float] = []
    stop = time.monotonic() + seconds

    def worker() -> None:
        with SegmentationClient(url) as client:
            while time.monotonic() < stop:
                client.segment(ph.ct, ph.spacing)
                done.append(time.monotonic())

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(done) / (max(done) - t0)


def soak(server: EmbeddedServer, minutes: float, load: float, window_s: float) -> dict[str, Any]:
    """Hold the server at ``load`` x its capacity for ``minutes``; every request's figures and the memory samples."""
    ph = generate(SEED, num_slices=SLICES, slice_thickness=SLICE_MM)
    with SegmentationClient(server.grpc_url) as client:
        reference = client.segment(ph.ct, ph.spacing).labels  # warm-up, and what every answer must equal
    cap = capacity(server.grpc_url, ph, in_flight=os.cpu_count() or 2)
    rate = load * cap
    interval = 1.0 / rate
    print(f"capacity {cap:.2f} volumes/s; soaking at {rate:.2f}/s ({load:.0%}) for {minutes:g} min", flush=True)
    requests: list[dict[str, Any]] = []
    memory: list[tuple[float, float]] = []
    local = threading.local()
    clients: list[SegmentationClient] = []  # one per worker thread, closed at the end

    def one(sent: float) -> None:
        if not hasattr(local, "client"):
            local.client = SegmentationClient(server.grpc_url, timeout_s=120)
            clients.append(local.client)
        t0 = time.monotonic()
        record: dict[str, Any] = {"t": round(t0 - start, 3), "late_s": round(t0 - sent, 3)}
        try:
            labels = local.client.segment(ph.ct, ph.spacing).labels
            record["ok"] = bool(np.array_equal(labels, reference))
            record["error"] = None if record["ok"] else "labels differ from the first answer"
        except MedsegError as e:
            record["ok"], record["error"] = False, str(e)
        record["latency_s"] = round(time.monotonic() - t0, 4)
        requests.append(record)

    start = time.monotonic()
    end = start + minutes * 60
    futures: list[Future[None]] = []
    next_sample = start
    with ThreadPoolExecutor(max_workers=8) as pool:
        n = 0
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                memory.append((round(now - start, 1), round(server.resident_mb(), 1)))
                next_sample += 10.0
            due = start + n * interval
            if now >= due:
                futures.append(pool.submit(one, due))
                n += 1
                continue
            time.sleep(min(due, next_sample) - now)
        for f in futures:
            f.result()
    for c in clients:
        c.close()
    memory.append((round(time.monotonic() - start, 1), round(server.resident_mb(), 1)))
    return {"capacity_per_s": round(cap, 3), "rate_per_s": round(rate, 3), "requests": requests, "memory_mb": memory,
            "window_s": window_s}


def figures(doc: dict[str, Any]) -> dict[str, Any]:
    """Errors, memory growth after the first window, p99 drift between the first and last windows."""
    reqs, window = doc["requests"], doc["window_s"]
    span = max(r["t"] for r in reqs)
    first = [r["latency_s"] for r in reqs if r["t"] < window and r["ok"]]
    last = [r["latency_s"] for r in reqs if r["t"] >= span - window and r["ok"]]
    # resident memory swings by a study's buffers while one is in flight: compare the windows' medians
    mem = doc["memory_mb"]
    end = mem[-1][0]
    first_mb = statistics.median(m for t, m in mem if t < window)
    last_mb = statistics.median(m for t, m in mem if t >= end - window)
    return {"requests": len(reqs), "errors": sum(not r["ok"] for r in reqs),
            "p50_s": round(statistics.median(r["latency_s"] for r in reqs), 3),
            "p99_first_s": round(p99(first), 3), "p99_last_s": round(p99(last), 3),
            "p99_drift": round(p99(last) / p99(first) - 1.0, 3),
            "rss_first_window_mb": round(first_mb, 1), "rss_last_window_mb": round(last_mb, 1),
            "rss_growth_mb": round(last_mb - first_mb, 1), "rss_peak_mb": max(m for _, m in mem)}


def verdicts(fig: dict[str, Any]) -> dict[str, bool]:
    """Each limit of the issue, held or not."""
    return {"0 errors": fig["errors"] <= LIMITS["errors"],
            f"resident memory growth < {LIMITS['rss_growth_mb']:.0f} MB": fig["rss_growth_mb"] < LIMITS["rss_growth_mb"],
            f"p99 drift < {LIMITS['p99_drift']:.0%}": fig["p99_drift"] < LIMITS["p99_drift"]}


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    """soak.json, soak.md and soak.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, held = doc["figures"], verdicts(doc["figures"])
    (out / "soak.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Soak: {doc['minutes']:g} min at {doc['load']:.0%} of capacity (cpu flavor)", "",
             f"Measured by `python -m perf.soak` on {doc['machine']} on {doc['date']}: a {SLICES}-slice 512 x 512 study "
             f"({SLICE_MM} mm slices); capacity {doc['capacity_per_s']:.2f} volumes/s, arrivals every "
             f"{1 / doc['rate_per_s']:.2f} s ({doc['rate_per_s']:.2f}/s); windows of {doc['window_s']:.0f} s.", "",
             "| figure | value |", "|---|---|",
             f"| requests | {fig['requests']} |", f"| errors | {fig['errors']} |", f"| p50 latency | {fig['p50_s']:.2f} s |",
             f"| p99 latency, first window | {fig['p99_first_s']:.2f} s |",
             f"| p99 latency, last window | {fig['p99_last_s']:.2f} s |", f"| p99 drift | {fig['p99_drift']:+.1%} |",
             f"| resident memory (server + model processes), median of the first window | {fig['rss_first_window_mb']:.0f} MB |",
             f"| the same, last window | {fig['rss_last_window_mb']:.0f} MB (growth {fig['rss_growth_mb']:+.0f} MB; "
             f"peak {fig['rss_peak_mb']:.0f} MB while a study was in flight) |", "",
             "| limit | held |", "|---|---|", *[f"| {k} | {'yes' if v else 'NO'} |" for k, v in held.items()], ""]
    (out / "soak.md").write_text("\n".join(lines))
    f, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    reqs = doc["requests"]
    a.plot([r["t"] / 60 for r in reqs], [r["latency_s"] for r in reqs], ".", ms=2)
    a.set_ylabel("latency s")
    a.set_title(f"soak at {doc['load']:.0%} of capacity ({doc['machine']})", fontsize=9)
    b.plot([t / 60 for t, _ in doc["memory_mb"]], [m for _, m in doc["memory_mb"]])
    b.set_ylabel("resident MB")
    b.set_xlabel("minutes")
    f.tight_layout()
    f.savefig(out / "soak.png", dpi=110)
    plt.close(f)
    return [out / "soak.json", out / "soak.md", out / "soak.png"]


def main(argv: list[str] | None = None) -> int:
    from perf.bench import machine_label

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--load", type=float, default=0.7, help="share of the measured capacity")
    ap.add_argument("--window", type=float, default=None, help="seconds of the first and last windows (default: a sixth)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results" / "soak")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or not 0 < args.load <= 1:
        ap.error(f"expected --minutes > 0 and 0 < --load <= 1, got --minutes {args.minutes:g} --load {args.load:g}")
    window = args.window or args.minutes * 60 / 6
    with EmbeddedServer(ServerOptions(grpc_port=0, http_port=0, metrics_port=0)) as server:
        doc = soak(server, args.minutes, args.load, window)
    doc.update({"minutes": args.minutes, "load": args.load, "machine": machine_label(),
                "date": time.strftime("%Y-%m-%d")})
    doc["figures"] = figures(doc)
    written = write(doc, args.out)
    print(f"{doc['figures']}\nwrote {', '.join(p.name for p in written)} in {args.out}")
    return 0 if all(verdicts(doc["figures"]).values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
