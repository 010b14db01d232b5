"""The cuda flavor's segmenter knobs measured on this machine: eager PyTorch against channels-last memory and the
``torch.compile`` modes (reduce-overhead: CUDA graphs), on the bench phantom's padded model grid, each checked
against the eager run's labels. A knob goes into the cuda flavor's config only where this shows it faster.

    python -m perf.segmenter_variants [--device cuda:0] [--slices 300] [--repeat 5] [--budget-s 240] [--out perf/results]

Writes ``<out>/<machine-label>/segmenter_variants.{json,md}``; variants past the time budget are listed as skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from medseg.paths import REPO_ROOT
from perf.report import med, write_result

SEED = 5101
VARIANTS = (("contiguous", "no"), ("channels_last", "no"), ("contiguous", "default"), ("contiguous", "reduce-overhead"),
            ("channels_last", "default"))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure(device: str, slices: int, repeat: int, budget_s: float,
            variants: tuple[tuple[str, str], ...] = VARIANTS) -> dict[str, Any]:
    """Per variant: the median time of ``repeat`` runs after two warm-ups (the compile happens there), the labels'
    agreement with the first variant's and the largest probability difference."""
    import torch

    from medseg.model.inference import TorchSegmenter
    from medseg.ops import torch_ops
    from medseg.synth.phantom import generate

    ph = generate(SEED, num_slices=slices)
    image, grid = torch_ops.preprocess(torch.from_numpy(ph.ct).to(device), ph.spacing)
    rows: list[dict[str, Any]] = []
    reference: tuple[np.ndarray, np.ndarray] | None = None
    t_start = time.perf_counter()
    for memory_format, mode in variants:
        row: dict[str, Any] = {"memory_format": memory_format, "compile": mode}
        rows.append(row)
        if time.perf_counter() - t_start > budget_s:
            row["skipped"] = f"past the {budget_s:.0f} s budget"
            continue
        try:
            seg = TorchSegmenter(device, "fp16", memory_format, mode)
            t0 = time.perf_counter()
            for _ in range(2):
                seg(image)
            _sync(device)
            row["warmup_s"] = round(time.perf_counter() - t0, 2)
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                labels, probabilities = seg(image)
                _sync(device)
                times.append(time.perf_counter() - t0)
        except Exception as e:  # a mode this torch or GPU cannot run is a finding, not a crash of the check
            row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        row["ms"] = round(1000 * med(times), 1)
        got = (labels.cpu().numpy(), probabilities.float().cpu().numpy())
        reference = reference or got
        row["label_agreement"] = round(float((got[0] == reference[0]).mean()), 6)
        row["max_probability_diff"] = round(float(np.abs(got[1] - reference[1]).max()), 5)
        del seg, labels, probabilities
    return {"device": device, "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "slices": slices, "padded_grid_zyx": list(image.shape[1:]),
            "model_grid_zyx": list(grid), "repeat": repeat, "rows": rows}


def parse_variants(text: str) -> tuple[tuple[str, str], ...]:
    """``memory_format:compile`` pairs, comma-separated."""
    pairs = []
    for item in text.split(","):
        memory_format, sep, mode = item.partition(":")
        if not sep:
            raise SystemExit(f"--variants: expected memory_format:compile pairs, got {item!r}")
        pairs.append((memory_format, mode))
    return tuple(pairs)


def markdown(doc: dict[str, Any]) -> str:
    """The variants as a table, the first (eager, contiguous) as the baseline of the ratios."""
    base = next((r["ms"] for r in doc["rows"] if "ms" in r), None)
    lines = [f"# Segmenter variants ({doc['device_name']}, torch {doc['torch']}, fp16 autocast)", "",
             f"Bench phantom {SEED}, {doc['slices']} slices -> padded model grid {doc['padded_grid_zyx']}; median of "
             f"{doc['repeat']} runs after two warm-ups. `python -m perf.segmenter_variants`.", "",
             "| memory format | torch.compile | time | vs eager | warm-up | labels as eager's | max probability diff |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "ms" not in r:
            lines.append(f"| {r['memory_format']} | {r['compile']} | {r.get('skipped') or r.get('failed')} | | | | |")
            continue
        ratio = f"x{base / r['ms']:.2f}" if base else ""
        lines.append(f"| {r['memory_format']} | {r['compile']} | {r['ms']:.1f} ms | {ratio} | {r['warmup_s']:.1f} s | "
                     f"{r['label_agreement']:.6f} | {r['max_probability_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from perf.bench import machine_label

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no further variant after this many seconds")
    ap.add_argument("--variants", default=None,
                    help="comma-separated memory_format:compile pairs (default: all), e.g. contiguous:no,channels_last:no")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results")
    args = ap.parse_args(argv)
    variants = VARIANTS if not args.variants else parse_variants(args.variants)
    doc = measure(args.device, args.slices, args.repeat, args.budget_s, variants)
    write_result(args.out / machine_label(), "segmenter_variants", doc, markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
