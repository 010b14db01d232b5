"""Driving the real ``perf_analyzer`` and reading Triton's own statistics.

``perf_analyzer`` is the binary from the tritonclient 2.48.0 wheel (``make perf-tools`` puts it in
``.perf_tools/bin``; it needs libb64 and libcudart, no GPU). Its inputs are written as raw binary files,
one per input tensor; its CSV gives client-side latency percentiles and throughput. The per-step
breakdown of the ensemble (queue, compute input, infer, output per composing model) comes from
Triton's statistics API, read before and after each measurement.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.paths import REPO_ROOT
from medseg_client.client import STAT_STEPS, model_statistics
from medseg_client.errors import ServerError
from medseg_client.spec import SPEC

BINARY = REPO_ROOT / ".perf_tools" / "bin" / "perf_analyzer"


def binary() -> Path:
    """The perf_analyzer binary, or a clear error saying how to get it."""
    if not BINARY.exists():
        raise ServerError(f"perf_analyzer not found at {BINARY}: run `make perf-tools`")
    return BINARY


def environment() -> dict[str, str]:
    """perf_analyzer's environment: libcudart from the nvidia-cuda-runtime-cu12 wheel on the library path."""
    lib = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cuda_runtime" / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def write_inputs(directory: Path, ct: np.ndarray, spacing: tuple[float, float, float]) -> list[str]:
    """Raw input files for ``--input-data DIR`` and the matching ``--shape`` arguments (batch dimension excluded)."""
    directory.mkdir(parents=True, exist_ok=True)
    ct_name, spacing_name = (t.name for t in SPEC.ensemble.inputs)
    np.ascontiguousarray(ct, dtype=np.int16).tofile(directory / ct_name)
    np.asarray(spacing, dtype=np.float32).tofile(directory / spacing_name)
    return [f"--shape={ct_name}:{','.join(str(n) for n in ct.shape)}", f"--shape={spacing_name}:3"]


@dataclass(frozen=True)
class Measurement:
    """One perf_analyzer row: throughput and client-side latencies (ms) at one concurrency."""

    concurrency: int
    throughput: float  # inferences (volumes) per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    client_send_ms: float
    client_recv_ms: float


def parse_csv(path: Path) -> list[Measurement]:
    """The rows of perf_analyzer's ``-f`` CSV (microseconds) as measurements in milliseconds."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            def ms(key: str, r: dict[str, str] = row) -> float:
                return float(r[key]) / 1000.0

            rows.append(Measurement(
                concurrency=int(row["Concurrency"]), throughput=float(row["Inferences/Second"]),
                p50_ms=ms("p50 latency"), p90_ms=ms("p90 latency"), p99_ms=ms("p99 latency"),
                client_send_ms=ms("Client Send"), client_recv_ms=ms("Client Recv"),
            ))
    return rows


def run(url: str, inputs_dir: Path, shapes: list[str], csv_path: Path, *, concurrency: tuple[int, int],
        shared_memory: str = "none", output_bytes: int = 0, requests_per_window: int = 3, timeout_s: float = 900,
        model: str = SPEC.ensemble.name) -> list[Measurement]:
    """One perf_analyzer sweep over concurrency ``(lo, hi)``; raises ServerError with its output if it fails."""
    cmd = [
        str(binary()), "-m", model, "-u", url, "-i", "grpc", "-b", "1",
        f"--input-data={inputs_dir}", *shapes,
        f"--concurrency-range={concurrency[0]}:{concurrency[1]}:1",
        "--measurement-mode=count_windows", f"--measurement-request-count={requests_per_window}",
        "--stability-percentage=60", "--max-trials=6",  # a 2-core box shares its cores with the client
        f"--shared-memory={shared_memory}", "-f", str(csv_path),
    ]
    if shared_memory != "none":
        cmd.append(f"--output-shared-memory-size={output_bytes}")
    proc = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not csv_path.exists():
        raise ServerError(f"perf_analyzer failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return parse_csv(csv_path)


def statistics(client: Any) -> dict[str, dict[str, float]]:
    """Cumulative per-model counters from Triton: successful requests and total ns per step."""
    return model_statistics(client.get_inference_statistics(as_json=True))


def breakdown(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean milliseconds per request of each step of each model between two statistics snapshots."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        n = a["count"] - b.get("count", 0.0)
        if n > 0:
            out[name] = {"requests": n, **{k: (a[k] - b.get(k, 0.0)) / n / 1e6 for k in STAT_STEPS}}
    return out
