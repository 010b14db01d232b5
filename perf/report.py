"""The benchmark report: bench.json, bench.csv, bench.md and PNG plots from one ``perf.bench`` run.

bench.md's headline block (between the ``headline`` markers) is copied verbatim into the README, so
the README's table is always the report's.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
import statistics
from pathlib import Path
from typing import Any

from medseg_client.client import STAT_STEPS
from medseg_client.spec import SPEC

BEGIN, END = "<!-- bench:headline:begin -->", "<!-- bench:headline:end -->"
E2E_TARGET_S, SPEEDUP_TARGET = 4.0, 4.0  # the cpu flavor's targets for a 512 x 512 x 300 CT through Triton
# the whole command on a 512 x 512 x 300 CT file (cpu flavor, 2 cores): seconds, ratio to MONAI on the same file;
# and the in-memory request's seconds
COMMAND_TARGET_S, COMMAND_SPEEDUP, REQUEST_TARGET_S = 4.0, 8.0, 2.0
# the whole command's parts, from its findings.json (start = process start and imports)
COMMAND_PARTS = (("start_s", "start"), ("read_study_s", "read"), ("request_s", "request"),
                 ("write_outputs_s", "write outputs"))
SERVER_PARTS = (("preprocess_s", "preprocess"), ("segmenter_s", "segmenter"), ("postprocess_s", "postprocess"))
GPU_P50_MS, GPU_VOLUMES_S, GPU_SPEEDUP, GPU_MIN_DICE = 150.0, 20.0, 10.0, 0.99  # the cuda flavor's, on one GPU


def write_result(out: Path, name: str, doc: dict[str, Any], markdown: str) -> None:
    """A measurement's record beside its report: ``out/<name>.json`` and ``out/<name>.md``; the report printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def row_line(row: dict[str, Any]) -> str:
    """One console line per study size."""
    return (f"{row['slices']} slices {tuple(row['shape_zyx'])}: MONAI {med(row['monai_s']):.2f} s, "
            f"in-process {med(row['reference_s']):.2f} s, served {med(row['served_s']):.2f} s "
            f"(x{row['speedup_vs_monai']:.1f} vs MONAI), served vs reference {row['dice_served_vs_reference']}")


def cmed(runs: list[dict[str, float]], key: str) -> float:
    """The median of one timing over runs (NaN where no run has it)."""
    values = [r[key] for r in runs if key in r]
    return float(statistics.median(values)) if values else float("nan")


def command_line(c: dict[str, Any]) -> str:
    """One console line per study file."""
    m = c["medseg"]
    return (f"{c['study']} ({c['file']}, {c['file_mb']} MB): medseg segment {cmed(m, 'wall_s'):.2f} s ("
            + ", ".join(f"{label} {cmed(m, key):.2f}" for key, label in COMMAND_PARTS)
            + f"), MONAI file to file {cmed(c['monai'], 'file_to_file_s'):.2f} s, x{c['speedup_vs_monai']:.1f}")


def command_table(doc: dict[str, Any]) -> list[str]:
    """The whole command per study file: its parts, the server's steps inside the request, MONAI beside it."""
    rows = doc.get("command") or []
    if not rows:
        return []
    lines = ["| CT file (x, y, z) | `medseg segment FILE`, whole command | start / read / request / write outputs "
             "| in the request: preprocess / segmenter / postprocess | MONAI pipeline, file to file | medseg vs MONAI |",
             "|---|---|---|---|---|---|"]
    for c in rows:
        m = c["medseg"]
        x, y, z = c["shape_xyz"]
        lines.append(f"| {c['study']}, {x} x {y} x {z} ({c['file_mb']:.0f} MB) | {cmed(m, 'wall_s'):.2f} s | "
                     + " / ".join(f"{cmed(m, k):.2f}" for k, _ in COMMAND_PARTS) + " s | "
                     + " / ".join(f"{cmed(m, k):.2f}" for k, _ in SERVER_PARTS) + " s | "
                     f"{cmed(c['monai'], 'file_to_file_s'):.2f} s | **x{c['speedup_vs_monai']:.1f}** |")
    lines += ["", "Whole command: `medseg segment FILE --out DIR` as a new process against the warm server (gRPC), "
                  "from its start to the last output written (labels.nii.gz, findings.json, preview.png); start = "
                  "process start and imports. MONAI: its pipeline as a script runs it on the same file (LoadImage, "
                  "Orientation, the baseline, SaveImage), without its imports and weights loading."]
    return lines


def _command_targets(doc: dict[str, Any]) -> list[str]:
    """The whole command's targets on each 512 x 512 x 300 file, the in-memory request's, and what bounds them."""
    rows = [c for c in doc.get("command") or [] if c["shape_xyz"][2] == 300]
    if not rows or doc["flavor"] != "cpu":
        return []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = ["## Targets: the user's command (cpu flavor, 512 x 512 x 300 CT files)", "", "| target | study | reached | |",
             "|---|---|---|---|"]
    for c in rows:
        wall = cmed(c["medseg"], "wall_s")
        lines.append(f"| whole command <= {COMMAND_TARGET_S:.0f} s | {c['study']} | {wall:.2f} s | "
                     f"{verdict(wall <= COMMAND_TARGET_S)} |")
        lines.append(f"| >= {COMMAND_SPEEDUP:.0f}x the MONAI pipeline on the same file | {c['study']} | "
                     f"x{c['speedup_vs_monai']:.1f} | {verdict(c['speedup_vs_monai'] >= COMMAND_SPEEDUP)} |")
        request = cmed(c["medseg"], "request_s")
        lines.append(f"| request <= {REQUEST_TARGET_S:.0f} s | {c['study']} | {request:.2f} s | "
                     f"{verdict(request <= REQUEST_TARGET_S)} |")
    lines.append("")
    for c in rows:
        m = c["medseg"]
        steps = sum(cmed(m, k) for k, _ in SERVER_PARTS)
        lines.append(f"What bounds it ({c['study']}): of {cmed(m, 'wall_s'):.2f} s, "
                     + ", ".join(f"{label} {cmed(m, k):.2f} s" for k, label in COMMAND_PARTS)
                     + f"; in the request the server's steps take {steps:.2f} s ("
                     + ", ".join(f"{label} {cmed(m, k):.2f} s" for k, label in SERVER_PARTS)
                     + f") and moving the study in and the labels out (gRPC, the ensemble's copies) "
                     f"{cmed(m, 'request_s') - steps:.2f} s.")
    return [*lines, ""]


def _study(row: dict[str, Any]) -> str:
    z, y, x = row["shape_zyx"]
    return f"{x} x {y} x {z}"


def _dice(d: dict[str, float]) -> str:
    return " / ".join(f"{d[lab.name]:.3f}" for lab in SPEC.labels[1:])


def headline(doc: dict[str, Any]) -> list[str]:
    """The README's table: per study size, MONAI vs in-process vs served, and their agreement."""
    names = " / ".join(lab.name for lab in SPEC.labels[1:])
    lines = [BEGIN,
             f"| CT study (x, y, z) | MONAI pipeline, in-process | medseg in-process | medseg served, gRPC "
             f"| medseg served, shared memory | served (gRPC) vs MONAI | Dice served vs in-process ({names}) |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {_study(r)} | {med(r['monai_s']):.2f} s | {med(r['reference_s']):.2f} s | "
                     f"{med(r['served_s']):.2f} s | {med(r['served_shm_s']):.2f} s | **x{r['speedup_vs_monai']:.1f}** | "
                     f"{_dice(r['dice_served_vs_reference'])} |")
    m, target = doc["machine"], "make bench-full" if doc["full"] else "make bench"
    lines += ["", "Served: client end to end, volume in memory -> labels and findings in memory, through the embedded "
                  "Triton server on the same machine; shared memory: the client's `shared_memory=True` "
                  "(`medseg segment --shared-memory`).",
              "", *([*command_table(doc), ""] if doc.get("command") else []),
              f"Measured by `{target}` on {m['label']} ({m['cores']} cores, {doc['flavor']} flavor) on "
                  f"{doc['date']}; medians of {doc['repeat']} runs (MONAI: {len(doc['rows'][0]['monai_s'])}).", END]
    return lines


def _targets(doc: dict[str, Any]) -> list[str]:
    rows = [r for r in doc["rows"] if r["slices"] == 300]
    if not rows or doc["flavor"] != "cpu":
        return []
    r = rows[0]
    e2e, e2e_shm, speedup = med(r["served_s"]), med(r["served_shm_s"]), r["speedup_vs_monai"]
    steps = r["steps_ms"]
    ensemble_ms = sum(steps.get(SPEC.ensemble.name, {}).get(k, 0.0) for k in STAT_STEPS)
    client_ms = e2e * 1000 - ensemble_ms
    parts = {name: sum(steps.get(name, {}).get(k, 0.0) for k in STAT_STEPS)
             for name in (SPEC.preprocess.name, SPEC.segmenter.name, SPEC.postprocess.name)}
    biggest = max(parts, key=lambda k: parts[k])
    lines = ["## Targets (cpu flavor, 512 x 512 x 300 CT through Triton)", "",
             "| target | reached | |", "|---|---|---|",
             f"| end to end <= {E2E_TARGET_S:.0f} s, gRPC | {e2e:.2f} s | {'met' if e2e <= E2E_TARGET_S else 'NOT met'} |",
             f"| end to end <= {E2E_TARGET_S:.0f} s, shared memory | {e2e_shm:.2f} s | "
             f"{'met' if e2e_shm <= E2E_TARGET_S else 'NOT met'} |",
             f"| >= {SPEEDUP_TARGET:.0f}x the MONAI baseline | x{speedup:.1f} | "
             f"{'met' if speedup >= SPEEDUP_TARGET else 'NOT met'} |", "",
             f"What bounds it: of {e2e * 1000:.0f} ms end to end, the ensemble takes {ensemble_ms:.0f} ms on the server "
             f"and the client's side (serializing {r['voxels'] * 2 / 1e6:.0f} MB in and {r['voxels'] / 1e6:.0f} MB of labels "
             f"out over gRPC, checks) {client_ms:.0f} ms; inside the ensemble "
             + ", ".join(f"{k} {v:.0f} ms" for k, v in parts.items())
             + f", {biggest} the largest (see the breakdown below). The same steps in-process take "
             f"{med(r['reference_s']):.2f} s: serving costs the copies of the volume, the segmenter's labels and "
             "probabilities and the study's labels through the python backend's shared memory (the compute "
             "input/output columns) and gRPC's serialization; "
             "perf_analyzer's C++ client with system shared memory shows the share of the latter.", ""]
    return lines


def _gpu_targets(doc: dict[str, Any]) -> list[str]:
    """The cuda flavor's targets for the 300-slice study: p50 with shared memory, volumes/s at the highest
    concurrency measured, and the ratio to MONAI on the same GPU."""
    rows = [r for r in doc["rows"] if r["slices"] == 300]
    if not rows or doc["flavor"] != "cuda":
        return []
    r = rows[0]
    pa_rows = r["perf_analyzer"]
    shm = pa_rows.get("cuda_shm") or pa_rows.get("system_shm") or []
    p50 = min((m["p50_ms"] for m in shm if m["concurrency"] == 1), default=float("nan"))
    best = max((m for ms in pa_rows.values() for m in ms), key=lambda m: m["throughput"], default=None)
    volumes_s = best["throughput"] if best else float("nan")
    speedup = r["speedup_vs_monai"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    where = f"{best['concurrency']} in flight" if best else "none measured"
    dice = min(r["dice_served_vs_reference"].values(), default=float("nan"))  # vs the cpu flavor's pipeline
    return ["## Targets (cuda flavor, 512 x 512 x 300 CT through Triton, one GPU)", "",
            "| target | reached | |", "|---|---|---|",
            f"| p50 <= {GPU_P50_MS:.0f} ms with shared memory (perf_analyzer, 1 in flight) | {p50:.0f} ms | "
            f"{verdict(p50 <= GPU_P50_MS)} |",
            f"| >= {GPU_VOLUMES_S:.0f} volumes/s at saturation | {volumes_s:.1f} ({where}) | "
            f"{verdict(volumes_s >= GPU_VOLUMES_S)} |",
            f"| >= {GPU_SPEEDUP:.0f}x the MONAI baseline on the same GPU (client, gRPC) | x{speedup:.1f} | "
            f"{verdict(speedup >= GPU_SPEEDUP)} |",
            f"| labels as the cpu flavor's (ONNX Runtime, in process): Dice >= {GPU_MIN_DICE} per label | "
            f"{dice:.4f} (lowest) | {verdict(dice >= GPU_MIN_DICE)} |", ""]


def _breakdown(doc: dict[str, Any]) -> list[str]:
    lines = ["## Where the time goes (Triton's statistics, mean ms per request)", "",
             "| study | model | queue | compute input | compute infer | compute output | total |", "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        for name in (SPEC.preprocess.name, SPEC.segmenter.name, SPEC.postprocess.name, SPEC.ensemble.name):
            s = r["steps_ms"].get(name)
            if s:
                total = sum(s[k] for k in STAT_STEPS)
                lines.append(f"| {_study(r)} | {name} | " + " | ".join(f"{s[k]:.0f}" for k in STAT_STEPS) + f" | {total:.0f} |")
    lines += ["", "The ensemble row is the whole server side; compute input/output of a python model include the copies "
                  "through the python backend's shared memory.", ""]
    return lines


def _perf_analyzer(doc: dict[str, Any]) -> list[str]:
    lines = ["## perf_analyzer (the real binary, from the tritonclient 2.48.0 wheel)", "",
             "Count windows of 3 requests, stable within 60% over 3 windows (at most 6); perf_analyzer runs on the "
             "same cores as the server. system_shm: inputs and outputs through system shared memory, not gRPC.", "",
             "| study | transport | concurrency | volumes/s | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        for transport, ms in r["perf_analyzer"].items():
            for m in sorted(ms, key=lambda m: m["concurrency"]):
                lines.append(f"| {_study(r)} | {transport} | {m['concurrency']} | {m['throughput']:.2f} | "
                             f"{m['p50_ms']:.0f} | {m['p90_ms']:.0f} | {m['p99_ms']:.0f} |")
    lines.append("")
    if doc["instances"]:
        lines += ["### Instances per model (300-slice study, gRPC)", "",
                  "| instances | concurrency | volumes/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        for s in doc["instances"]:
            for m in sorted(s["rows"], key=lambda m: m["concurrency"]):
                lines.append(f"| {s['instances']} | {m['concurrency']} | {m['throughput']:.2f} | {m['p50_ms']:.0f} | "
                             f"{m['p99_ms']:.0f} |")
        lines.append("")
    return lines


def _scaling(doc: dict[str, Any]) -> list[str]:
    lines = ["## Cost vs volume size", "",
             "| study | voxels (M) | MONAI s | in-process s | served (gRPC) s | served (gRPC) ms per M voxels |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        mv = r["voxels"] / 1e6
        lines.append(f"| {_study(r)} | {mv:.1f} | {med(r['monai_s']):.2f} | {med(r['reference_s']):.2f} | "
                     f"{med(r['served_s']):.2f} | {med(r['served_s']) * 1000 / mv:.0f} |")
    lines += ["", "## Accuracy against the phantom's truth (Dice " + " / ".join(lab.name for lab in SPEC.labels[1:]) + ")", "",
              "| study | MONAI pipeline | medseg served | MONAI vs medseg in-process |", "|---|---|---|---|"]
    for r in doc["rows"]:
        t = r["dice_vs_truth"]
        lines.append(f"| {_study(r)} | {_dice(t['monai'])} | {_dice(t['served'])} | {_dice(r['dice_monai_vs_reference'])} |")
    lines.append("")
    return lines


def plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """Latency and throughput vs concurrency, latency vs size, per-step breakdown (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, ylabel, name in (("p50_ms", "p50 latency (ms)", "latency_vs_concurrency.png"),
                                 ("throughput", "volumes / s", "throughput_vs_concurrency.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in doc["rows"]:
            for transport, ms in r["perf_analyzer"].items():
                ms = sorted(ms, key=lambda m: m["concurrency"])
                ax.plot([m["concurrency"] for m in ms], [m[metric] for m in ms], marker="o",
                        label=f"{_study(r)}, {transport}")
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs concurrency ({doc['machine']['label']})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    mv = [r["voxels"] / 1e6 for r in doc["rows"]]
    for key, label in (("monai_s", "MONAI pipeline (in-process)"), ("reference_s", "medseg in-process"),
                       ("served_s", "medseg served (gRPC)"), ("served_shm_s", "medseg served (shared memory)")):
        ax.plot(mv, [med(r[key]) for r in doc["rows"]], marker="o", label=label)
    ax.set_xlabel("study voxels (millions)")
    ax.set_ylabel("seconds per study")
    ax.set_title(f"latency vs volume size ({doc['machine']['label']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_size.png", dpi=110)
    plt.close(fig)
    written.append(out / "latency_vs_size.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    models = (SPEC.preprocess.name, SPEC.segmenter.name, SPEC.postprocess.name)
    labels = [_study(r) for r in doc["rows"]]
    bottom = [0.0] * len(doc["rows"])
    for model in models:
        for step in STAT_STEPS[1:]:
            vals = [r["steps_ms"].get(model, {}).get(step, 0.0) for r in doc["rows"]]
            ax.bar(labels, vals, bottom=bottom, label=f"{model} {step.replace('compute_', '')}")
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    client = [med(r["served_s"]) * 1000 - sum(r["steps_ms"].get(SPEC.ensemble.name, {}).get(k, 0.0) for k in STAT_STEPS)
              for r in doc["rows"]]
    ax.bar(labels, client, bottom=bottom, label="client + transfer", color="lightgrey")
    ax.set_ylabel("ms per study")
    ax.set_title(f"where the time goes, served ({doc['machine']['label']})", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=110)
    plt.close(fig)
    written.append(out / "breakdown.png")
    return written


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    """Every report file of one run into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    doc.setdefault("date", datetime.date.today().isoformat())
    (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slices", "voxels", "what", "transport", "concurrency", "seconds_or_ms", "value"])
        for r in doc["rows"]:
            for key, transport in (("monai_s", ""), ("reference_s", ""), ("served_s", "grpc"), ("served_shm_s", "system_shm")):
                for v in r[key]:
                    w.writerow([r["slices"], r["voxels"], key.removesuffix("_s").removesuffix("_shm"), transport, "", "s", v])
            for transport, ms in r["perf_analyzer"].items():
                for m in ms:
                    for k in ("throughput", "p50_ms", "p90_ms", "p99_ms"):
                        w.writerow([r["slices"], r["voxels"], f"perf_analyzer {k}", transport, m["concurrency"],
                                    "volumes/s" if k == "throughput" else "ms", m[k]])
    m = doc["machine"]
    md = [f"# medseg benchmark: {m['label']}", "",
          f"{doc['date']}, {doc['flavor']} flavor, {m['platform']}, {m['cores']} cores. Studies: phantom seed {doc['seed']} "
          f"(never trained on), 512 x 512 at {doc['pixel_mm']} mm, {doc['slice_mm']} mm slices. Same weights everywhere. "
          f"Whole run: {doc['wall_s']:.0f} s.", "", *headline(doc), "", *_command_targets(doc), *_targets(doc), *_gpu_targets(doc),
          *_breakdown(doc),
          *_perf_analyzer(doc), *_scaling(doc),
          "![latency vs size](latency_vs_size.png) ![breakdown](breakdown.png)", "",
          "![latency vs concurrency](latency_vs_concurrency.png) ![throughput vs concurrency](throughput_vs_concurrency.png)", ""]
    (out / "bench.md").write_text("\n".join(md))
    return [out / "bench.json", out / "bench.csv", out / "bench.md", *plots(doc, out)]


def headline_block(text: str, begin: str = BEGIN, end: str = END) -> str:
    """The block between ``begin`` and ``end`` (markers included; the headline's by default) of a markdown text;
    raises ValueError if it has none."""
    found = re.search(re.escape(begin) + r".*?" + re.escape(end), text, flags=re.S)
    if not found:
        raise ValueError(f"no {begin} ... {end} block")
    return found.group(0)


def update_readme(readme: Path, bench_md: Path, begin: str = BEGIN, end: str = END) -> None:
    """Replace the README's block (the headline's by default) with the report's."""
    text = readme.read_text()
    readme.write_text(text.replace(headline_block(text, begin, end), headline_block(bench_md.read_text(), begin, end)))
