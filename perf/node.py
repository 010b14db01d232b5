"""The PACS node measured as a hospital runs it: a real PACS (Debian's Orthanc) forwards a stream of CT studies to
``medseg node``, which segments them on the embedded Triton server (cpu flavor) and sends SEG + SR + preview back.

    python -m perf.node [--studies 12] [--stat-every 4]    # -> perf/results/<machine>/node.md, node.json

Studies: phantoms of full size (100-300 slices of 512 x 512) and TotalSegmentator's real DICOM series (`make
realct`; 20 slices, JPEG 2000) under new UIDs, one copy routine and one STAT. First one STAT study alone (its
latency with nothing else queued, after one warm-up request), then the stream: the PACS sends each study as soon
as the previous one is stored, every ``stat_every``-th to the node's STAT AE title. Receipt-to-result: from the
series' last instance received to every result confirmed stored in the PACS (the quiet period included); studies
per hour: the stream's studies over the time from its first receipt to its last result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medseg.paths import REPO_ROOT
from medseg.serving.server import EmbeddedServer, ServerOptions, free_port
from perf.bench import machine_label
from perf.report import write_result
from tests.helpers import node_config, node_jobs, wait_until
from tests.orthanc import Orthanc
from tests.realct import dicom_series_copy

REAL_DICOM = REPO_ROOT / ".cache" / "realct" / "reference_files" / "example_ct_dicom"
QUIET_S = 2.0


def study_files(work: Path, n: int, stat_every: int) -> list[tuple[str, list[Path], str]]:
    """``n`` studies: (kind, files, study UID); two of them the real series (the first of the stream, routine,
    and its first STAT one), the rest phantoms."""
    import pydicom

    from medseg.synth.phantom import generate
    from medseg_client.io.studies import write_dicom_series

    studies = []
    for i in range(n):
        if i in (1, stat_every) and REAL_DICOM.is_dir():
            files, kind = dicom_series_copy(work / f"real{i}", f"medseg-node-bench-{i}", REAL_DICOM), "real CT (20 slices)"
        else:
            ph = generate(6100 + i)
            files, kind = write_dicom_series(ph, work / f"ph{i}"), f"phantom ({ph.ct.shape[0]} slices)"
        studies.append((kind, files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)))
    return studies


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(n: int, stat_every: int, work: Path) -> dict[str, Any]:
    studies = study_files(work / "studies", n + 1, stat_every)
    alone, stream = studies[0], studies[1:]
    log = work / "tritonserver.log"
    options = ServerOptions(flavor="cpu", grpc_port=0, http_port=0, metrics_port=0)
    with EmbeddedServer(options, log_file=log) as server, Orthanc(work / "pacs", aet="PACS") as pacs:
        from medseg.synth.phantom import generate
        from medseg_client.client import SegmentationClient

        with SegmentationClient(server.grpc_url) as client:  # the server's first request warms its sessions up
            ph = generate(5101, num_slices=24)
            client.segment(ph.ct, ph.spacing)
        port = free_port()
        config = node_config(work / "node", server.grpc_url, port, {"pacs": ("PACS", pacs.dicom_port)},
                             quiet_period_s=QUIET_S)
        pacs.add_modality("medseg", "MEDSEG", "127.0.0.1", port)
        pacs.add_modality("medseg_stat", "MEDSEG_STAT", "127.0.0.1", port)
        ids: dict[str, str] = {}
        for _, files, uid in studies:
            pacs.upload(files)
            ids[uid] = pacs.study_by_uid(uid) or ""
        with subprocess.Popen([sys.executable, "-m", "medseg_client.cli", "node", "--config", str(config)],
                              stdout=open(work / "node.log", "w"), stderr=subprocess.STDOUT) as node:
            try:
                wait_until(lambda: "listening on" in (work / "node.log").read_text(), "the node listening", 60)
                pacs.store_to("medseg_stat", ids[alone[2]])
                wait_until(lambda: any(j["state"] == "sent" for j in node_jobs(config)), "the STAT study alone", 300)
                priorities = {}
                for i, (_, _, uid) in enumerate(stream):
                    stat = (i + 1) % stat_every == 0
                    priorities[uid] = "stat" if stat else "routine"
                    pacs.store_to("medseg_stat" if stat else "medseg", ids[uid])
                wait_until(lambda: sum(j["state"] == "sent" for j in node_jobs(config)) == len(studies), "every study back",
                           60 * len(studies))
            finally:
                node.terminate()
                node.wait(60)
    by_uid = {j["study_uid"]: j for j in node_jobs(config)}
    rows = []
    for kind, files, uid in studies:
        j = by_uid[uid]
        timings = json.loads(j["timings"] or "{}")
        rows.append({"kind": kind, "priority": j["priority"], "alone": uid == alone[2], "files": len(files),
                     "receipt_to_result_s": j["sent_at"] - j["received_at"], "queued_s": j["started_at"] - j["queued_at"],
                     "segment_s": j["segmented_at"] - j["started_at"], "send_s": j["sent_at"] - j["segmented_at"],
                     "read_s": timings["read_s"], "request_s": timings["segment_s"], "objects_s": timings["objects_s"],
                     "status": json.loads(j["summary"])["status"]})
    streamed = [r for r in rows if not r["alone"]]
    t_first = min(by_uid[uid]["received_at"] for _, _, uid in stream)
    t_last = max(by_uid[uid]["sent_at"] for _, _, uid in stream)
    summary = {p: {"n": len(v), "p50_s": pct(v, 50), "p95_s": pct(v, 95)} for p in ("stat", "routine")
               if (v := [r["receipt_to_result_s"] for r in streamed if r["priority"] == p])}
    return {"machine": machine_label(), "date": time.strftime("%Y-%m-%d"), "quiet_period_s": QUIET_S,
            "workers": 1, "stat_workers": 1, "stat_every": stat_every, "rows": rows, "latency": summary,
            "alone_stat_s": next(r["receipt_to_result_s"] for r in rows if r["alone"]),
            "studies_per_hour": len(stream) * 3600 / (t_last - t_first)}


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# medseg node: receipt to result ({doc['machine']}, {doc['date']})", "",
             f"Orthanc (Debian 1.10) forwards {sum(not r['alone'] for r in doc['rows'])} CT studies to `medseg node` "
             f"(every {doc['stat_every']}th to its STAT AE title) as fast as it can send them; the node segments them "
             "on the embedded Triton server (cpu flavor) with one routine and one STAT worker and sends SEG + SR + "
             f"preview back to Orthanc. Quiet period {doc['quiet_period_s']:g} s (included in every latency). "
             "`python -m perf.node`.", "",
             "| priority | studies | receipt-to-result p50 | p95 |", "|---|---|---|---|"]
    for p, s in doc["latency"].items():
        lines.append(f"| {p} | {s['n']} | {s['p50_s']:.1f} s | {s['p95_s']:.1f} s |")
    lines += ["", f"- a STAT study alone (nothing queued): {doc['alone_stat_s']:.1f} s receipt to result",
              f"- throughput: **{doc['studies_per_hour']:.0f} studies/hour** (first receipt to last result of the stream)",
              "", "| study | priority | slices | receipt-to-result | queued | segment (read + request + objects) | send |",
              "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['kind']}{' (alone)' if r['alone'] else ''} | {r['priority']} | {r['files']} | "
                     f"{r['receipt_to_result_s']:.1f} s | {r['queued_s']:.1f} s | {r['segment_s']:.1f} s "
                     f"({r['read_s']:.1f} + {r['request_s']:.1f} + {r['objects_s']:.1f}) | "
                     f"{r['send_s']:.1f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=12, help="studies in the stream (default 12)")
    ap.add_argument("--stat-every", type=int, default=4, help="every Nth study of the stream is STAT (default 4)")
    ap.add_argument("--out", type=Path, default=None, help="folder of node.md and node.json (default perf/results/<machine>)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medseg-node-bench-") as tmp:
        doc = run(args.studies, args.stat_every, Path(tmp))
    write_result(args.out or REPO_ROOT / "perf" / "results" / doc["machine"], "node", doc, markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
