"""``make bench``: the served ensemble against the same steps run in-process, measured in one run.

    python -m perf.bench [--seeds 5101 5102] [--repeat 3] [--out perf/results]

For each phantom: the in-process reference pipeline (DALI on CPU -> ONNX Runtime -> postprocess) and
the ensemble through the embedded Triton server over gRPC (volume in memory -> labels in memory),
median of ``--repeat`` runs each, and their ratio; the served labels are checked against the
reference's (Dice >= 0.99 per label). Results go to ``<out>/<machine-label>/bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from medseg_client.client import SegmentationClient

from medseg.metrics import dice
from medseg.phantom import generate
from medseg.pipeline import ReferencePipeline
from medseg.server import EmbeddedServer, ServerOptions
from medseg.spec import REPO_ROOT, SPEC


def machine_label() -> str:
    """A short name of this machine's kind: cores and CPU model."""
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    short = "".join(c if c.isalnum() else "-" for c in model).strip("-").lower()
    while "--" in short:
        short = short.replace("--", "-")
    return f"{os.cpu_count()}core-{short[:40]}"


def timed(fn: Any, repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[5101, 5102])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results")
    args = ap.parse_args(argv)
    reference = ReferencePipeline()
    rows = []
    with EmbeddedServer(ServerOptions(grpc_port=0, http_port=0, metrics_port=0)) as server, \
            SegmentationClient(server.grpc_url) as client:
        client.wait_until_ready()
        for seed in args.seeds:
            ph = generate(seed)
            ref_s, (ref_labels, _) = timed(lambda ph=ph: reference(ph.ct, ph.spacing), args.repeat)
            srv_s, result = timed(lambda ph=ph: client.segment(ph.ct, ph.spacing), args.repeat)
            agreement = {lab.name: round(dice(result.labels == lab.value, ref_labels == lab.value), 4)
                         for lab in SPEC.labels[1:]}
            row = {"seed": seed, "shape_zyx": list(ph.ct.shape), "spacing_zyx_mm": list(ph.spacing),
                   "in_process_s": round(ref_s, 3), "served_s": round(srv_s, 3),
                   "served_over_in_process": round(srv_s / ref_s, 3), "server_stages_s": result.timings_s,
                   "dice_served_vs_reference": agreement}
            rows.append(row)
            print(f"seed {seed} {ph.ct.shape}: in-process {ref_s:.2f} s, served {srv_s:.2f} s "
                  f"(x{srv_s / ref_s:.2f}), agreement {agreement}", flush=True)
    label = machine_label()
    out = args.out / label
    out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": {"label": label, "platform": platform.platform(), "cores": os.cpu_count()},
           "repeat": args.repeat, "rows": rows}
    (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# medseg bench on {label}", "",
             "| study (z, y, x) | in-process s | served (gRPC) s | served / in-process | Dice served vs reference |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {tuple(r['shape_zyx'])} | {r['in_process_s']:.2f} | {r['served_s']:.2f} | "
                     f"{r['served_over_in_process']:.2f} | {r['dice_served_vs_reference']} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/bench.json and bench.md")
    ok = all(v >= 0.99 for r in rows for v in r["dice_served_vs_reference"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
