"""``make bench``: the served ensemble against the MONAI pipeline people run today, measured in one run.

    python -m perf.bench [--full] [--repeat 3] [--flavor cpu|cuda] [--out perf/results] [--readme]

For each phantom CT size (512 x 512 x 100 and x 300; ``--full`` adds x 600), on the same machine and
weights, one after another:
  - the MONAI baseline in-process (``perf.monai_baseline``: Spacing, ScaleIntensityRange, 96^3 sliding
    window, inverse spacing, argmax);
  - the reference pipeline in-process (this project's steps without a server);
  - the ensemble through the embedded Triton server from the client, volume in memory -> labels in
    memory, over gRPC and over system shared memory, with Triton's per-step breakdown;
  - the user's command on files (``perf.command``): ``medseg segment FILE --out DIR`` as a new process on the
    300-slice phantom and on a real CT resampled to 512 x 512 x 300, the MONAI pipeline's script on the same files;
  - ``perf_analyzer`` over gRPC and system shared memory (and CUDA shared memory with ``--flavor cuda``)
    at concurrency 1..2 (``--full``: 1..4, and a 600-slice study at 1..2; then 1 vs 2 instances per model;
    ``--instances N``: 1..N instances, at concurrency 1..``--max-concurrency``).
Speed never costs correctness: the served labels must equal the reference's (Dice >= 0.99 per label),
or the run fails. Results: ``<out>/<machine-label>/`` bench.json, bench.csv, bench.md and PNG plots;
the README's headline table is bench.md's.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medseg.accuracy.metrics import AGREEMENT_DICE, dice
from medseg.model.pipeline import ReferencePipeline
from medseg.model.provenance import cpu_model
from medseg.paths import MODEL_REPOSITORY, REPO_ROOT
from medseg.serving.server import EmbeddedServer, ServerOptions
from medseg.synth.phantom import Phantom, generate
from medseg_client.client import SegmentationClient
from medseg_client.spec import SPEC
from perf import command, pa, report
from perf.monai_baseline import MonaiBaseline

SEED = 5101  # never used in training or validation
SLICE_MM, PIXEL_MM = 1.25, 0.78  # a typical abdominal CT: 400 mm field of view, 1.25 mm slices
SHORT_SIZES, FULL_SIZES = (100, 300), (100, 300, 600)
HEADLINE_SLICES = 300


def machine_label() -> str:
    """A short name of this machine's kind: cores and CPU model (and GPU, where there is one)."""
    model = cpu_model() or "cpu"
    short = "".join(c if c.isalnum() else "-" for c in model).strip("-").lower()
    while "--" in short:
        short = short.replace("--", "-")
    label = f"{os.cpu_count()}core-{short[:40]}"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(0)).lower()
            label += f"-{gpu[:24]}"
    except ImportError:
        pass
    return label


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """Wall times (s) of ``repeat`` calls and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Dice per foreground label between two label volumes (1.0 where neither has the label)."""
    out = {}
    for lab in SPEC.labels[1:]:
        x, y = a == lab.value, b == lab.value
        out[lab.name] = round(dice(x, y), 4) if (x.any() or y.any()) else 1.0
    return out


@contextmanager
def served(flavor: str, instances: int = 1) -> Iterator[EmbeddedServer]:
    """The embedded server on free ports; ``instances`` > 1 serves a copy of the repository with that count."""
    repo, tmp = MODEL_REPOSITORY, None
    if instances != 1:
        import medseg.serving.configgen as configgen

        tmp = Path(tempfile.mkdtemp(prefix="medseg-bench-"))
        flavored = {rel: cfg for rel, cfg in configgen.config_dicts().items() if rel.endswith(f"configs/{flavor}.pbtxt")}
        for cfg in flavored.values():
            cfg["instance_group"][0]["count"] = instances
        repo = configgen.repository_variant(tmp / "model_repository", flavored)
    extra = []
    if flavor == "cuda":
        from medseg.serving.flavors import cuda_memory_pool_args

        extra = cuda_memory_pool_args()
    try:
        with EmbeddedServer(ServerOptions(flavor=flavor, grpc_port=0, http_port=0, metrics_port=0,
                                          model_repository=repo, extra_args=extra)) as server:
            yield server
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def in_process(ph: Phantom, args: argparse.Namespace, monai: MonaiBaseline,
               reference: ReferencePipeline) -> tuple[dict[str, Any], np.ndarray]:
    """The MONAI baseline's and the reference pipeline's figures of one study (no server running: the
    MONAI pipeline's inverse resampling of full-size logits needs the memory), and the reference labels."""
    row: dict[str, Any] = {"slices": int(ph.ct.shape[0]), "shape_zyx": list(ph.ct.shape),
                           "spacing_zyx_mm": list(ph.spacing), "voxels": int(ph.ct.size)}
    monai_t, monai_labels = timed(lambda: monai(ph.ct, ph.spacing), args.monai_repeat)
    ref_t, (ref_labels, _) = timed(lambda: reference(ph.ct, ph.spacing), args.repeat)
    row.update({"monai_s": [round(t, 3) for t in monai_t], "reference_s": [round(t, 3) for t in ref_t],
                "dice_monai_vs_reference": agreement(monai_labels, ref_labels),
                "dice_vs_truth": {"monai": agreement(monai_labels, ph.labels)}})
    return row, ref_labels


def served_figures(row: dict[str, Any], ph: Phantom, ref_labels: np.ndarray, args: argparse.Namespace,
                   server: EmbeddedServer, work: Path) -> None:
    """Add the served figures of one study to its row: client end to end over gRPC and shared memory with
    Triton's breakdown, then perf_analyzer's sweeps."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(server.grpc_url)
    with SegmentationClient(server.grpc_url) as client:
        client.segment(ph.ct, ph.spacing)  # warm-up: first-touch of the backends' shared memory
        before = pa.statistics(stats)
        srv_t, result = timed(lambda: client.segment(ph.ct, ph.spacing), args.repeat)
        after = pa.statistics(stats)
    with SegmentationClient(server.grpc_url, shared_memory=True) as client:
        client.segment(ph.ct, ph.spacing)
        shm_t, shm_result = timed(lambda: client.segment(ph.ct, ph.spacing), args.repeat)
    row.update({
        "served_s": [round(t, 3) for t in srv_t], "served_shm_s": [round(t, 3) for t in shm_t],
        "steps_ms": {k: {s: round(v, 1) for s, v in d.items()} for k, d in pa.breakdown(before, after).items()},
        "dice_served_vs_reference": agreement(result.labels, ref_labels),
        "dice_served_shm_vs_reference": agreement(shm_result.labels, ref_labels),
    })
    row["dice_vs_truth"]["served"] = agreement(result.labels, ph.labels)
    row["speedup_vs_monai"] = round(statistics.median(row["monai_s"]) / statistics.median(srv_t), 2)
    del result, shm_result
    gc.collect()  # the largest study's perf_analyzer sweep needs the memory back
    slices = row["slices"]
    inputs = work / f"inputs-{slices}"
    shapes = pa.write_inputs(inputs, ph.ct, ph.spacing)
    row["perf_analyzer"] = {}
    transports = {"grpc": "none", "system_shm": "system"}
    if args.flavor == "cuda":
        transports["cuda_shm"] = "cuda"
    for name, transport in transports.items():
        csv_path = work / f"pa-{slices}-{transport}.csv"
        # a 24 GiB box cannot hold four 600-slice requests in flight beside everything else
        top = args.max_concurrency if slices <= HEADLINE_SLICES else min(2, args.max_concurrency)
        rows = pa.run(server.grpc_url, inputs, shapes, csv_path, concurrency=(1, top),
                      shared_memory=transport, output_bytes=int(ph.ct.size) + (1 << 20))
        row["perf_analyzer"][name] = [m.__dict__ for m in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all sizes, concurrency 1..4, 1 vs 2 instances")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the reference and the served pipeline per size")
    ap.add_argument("--monai-repeat", type=int, default=1, help="runs of the MONAI baseline per size")
    ap.add_argument("--flavor", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results")
    ap.add_argument("--readme", action="store_true", help="copy the report's headline table into README.md")
    ap.add_argument("--instances", type=int, default=None,
                    help="compare 1..N instances of every model with perf_analyzer on the 300-slice study (--full: 2)")
    ap.add_argument("--max-concurrency", type=int, default=None,
                    help="perf_analyzer's top concurrency (default 2; --full 4; a GPU saturates higher)")
    args = ap.parse_args(argv)
    args.max_concurrency = args.max_concurrency or (4 if args.full else 2)
    args.instances = args.instances or (2 if args.full else 1)
    sizes = FULL_SIZES if args.full else SHORT_SIZES
    pa.binary()  # fail before the long work if perf_analyzer is missing

    t_start = time.perf_counter()
    # the baseline on the flavor's device: MONAI on the GPU against the cuda flavor
    monai, reference = MonaiBaseline(device="cuda" if args.flavor == "cuda" else "cpu"), ReferencePipeline()
    rows: list[dict[str, Any]] = []
    scaling: list[dict[str, Any]] = []
    studies = {n: generate(SEED, num_slices=n, slice_thickness=SLICE_MM, pixel_spacing=PIXEL_MM)
               for n in tqdm(sizes, desc="phantoms", unit="study")}
    references = {}
    for n in tqdm(sizes, desc="in-process (MONAI, reference)", unit="size"):
        row, references[n] = in_process(studies[n], args, monai, reference)
        rows.append(row)
    del monai, reference
    gc.collect()
    commands: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as tmp, served(args.flavor) as server:
        for row in tqdm(rows, desc="served", unit="size"):
            served_figures(row, studies[row["slices"]], references.pop(row["slices"]), args, server, Path(tmp))
            print(report.row_line(row), flush=True)
        # the user's command on files: the headline phantom and a real CT of the same matrix, MONAI beside it
        files = {f"phantom {SEED}": command.phantom_file(studies[HEADLINE_SLICES], Path(tmp) / "phantom")}
        if command.REAL_CT.is_file():
            files["TotalSegmentator example_ct"] = command.real_ct_file(command.REAL_CT, Path(tmp) / "real" / "ct.nii.gz")
        else:
            print(f"no real CT at {command.REAL_CT} (make realct): the whole command is measured on the phantom only")
        commands = command.measure(server.grpc_url, files, Path(tmp) / "command", args.repeat, args.monai_repeat,
                                   "cuda" if args.flavor == "cuda" else "cpu")
        for c in commands:
            print(report.command_line(c), flush=True)
    if args.instances > 1:  # instance count: 1..N instances of every model, the 300-slice study
        ph = studies[HEADLINE_SLICES]
        with tempfile.TemporaryDirectory(prefix="medseg-bench-") as tmp:
            inputs = Path(tmp) / "inputs"
            shapes = pa.write_inputs(inputs, ph.ct, ph.spacing)
            for instances in range(1, args.instances + 1):
                with served(args.flavor, instances) as server:
                    ms = pa.run(server.grpc_url, inputs, shapes, Path(tmp) / f"inst{instances}.csv",
                                concurrency=(1, args.max_concurrency))
                scaling.append({"instances": instances, "slices": HEADLINE_SLICES, "rows": [m.__dict__ for m in ms]})

    label = machine_label()
    doc = {"machine": {"label": label, "platform": platform.platform(), "cores": os.cpu_count(),
                       "processor": label.split("-", 1)[1]},
           "flavor": args.flavor, "full": args.full, "repeat": args.repeat, "seed": SEED,
           "slice_mm": SLICE_MM, "pixel_mm": PIXEL_MM, "rows": rows, "instances": scaling, "command": commands,
           "wall_s": round(time.perf_counter() - t_start, 1)}
    out = args.out / label
    written = report.write(doc, out)
    if args.readme:
        report.update_readme(REPO_ROOT / "README.md", out / "bench.md")
    print(f"wrote {', '.join(p.name for p in written)} in {out} ({doc['wall_s']:.0f} s)")
    bad = [(r["slices"], k, v) for r in rows for key in ("dice_served_vs_reference", "dice_served_shm_vs_reference")
           for k, v in r[key].items() if v < AGREEMENT_DICE]
    for slices, name, value in bad:
        print(f"FAIL: {slices} slices, {name}: served vs reference Dice {value} < {AGREEMENT_DICE}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
