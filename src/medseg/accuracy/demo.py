"""``medseg demo``: the whole product in one command on a plain machine.

Starts the embedded Triton server (cpu flavor), writes an unseen phantom as a DICOM series,
segments it through the ensemble with the client, compares the result with the phantom's ground
truth (liver Dice, tumors found) and stops the server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.accuracy.metrics import ACCEPTANCE, dice, match_tumors
from medseg.serving.server import EmbeddedServer, ServerOptions
from medseg.synth.phantom import generate
from medseg_client.cli import summary
from medseg_client.io.studies import write_phantom
from medseg_client.segment import FINDINGS_FILE, LABELS_FILE, segment_to_dir
from medseg_client.spec import SPEC


def _voxels(path: Path) -> np.ndarray:
    img: Any = nib.load(str(path))
    return np.asanyarray(img.dataobj)


def run_demo(out: Path, seed: int) -> int:
    """Run the demo into ``out``; returns 0 when the study is reported, its liver Dice reaches the acceptance bar
    and every tumor of 10 mm or more is found."""
    study_dir = out / "study"
    study_dir.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails here, before any work
    print(f"[1/4] phantom seed {seed} (never used in training) -> {study_dir}/dicom", flush=True)
    ph = generate(seed)
    write_phantom(ph, study_dir, "dicom")
    print(f"      {ph.ct.shape[2]}x{ph.ct.shape[1]}x{ph.ct.shape[0]} voxels at "
          f"{ph.spacing[2]:.2f}x{ph.spacing[1]:.2f}x{ph.spacing[0]:.2f} mm, {len(ph.tumors)} tumor(s)", flush=True)
    print("[2/4] starting the embedded Triton Inference Server (cpu flavor)", flush=True)
    t0 = time.monotonic()
    with EmbeddedServer(ServerOptions(grpc_port=0, http_port=0, metrics_port=0),
                        log_file=out / "tritonserver.log") as server:
        print(f"      ready in {time.monotonic() - t0:.1f} s at {server.grpc_url}", flush=True)
        print(f"[3/4] medseg segment --url {server.grpc_url} {study_dir}/dicom --out {out}/result", flush=True)
        doc = segment_to_dir(server.grpc_url, study_dir / "dicom", out / "result", SPEC.ensemble.name, 600.0)
    print(summary(doc))
    print("[4/4] against the ground truth", flush=True)
    pred = _voxels(out / "result" / LABELS_FILE)
    truth = _voxels(study_dir / "labels_truth.nii.gz")
    liver = dice(pred > 0, truth > 0)
    tumor = dice(pred == SPEC.label("liver_tumor").value, truth == SPEC.label("liver_tumor").value)
    matches = match_tumors([t.__dict__ for t in ph.tumors], doc["findings"]["tumors"])
    for m in matches:
        state = f"found as tumor {m['matched_id']}" if m["matched_id"] else "MISSED"
        print(f"      true tumor {m['diameter_mm']:.1f} mm: {state}")
    big_found = all(m["matched_id"] for m in matches if m["diameter_mm"] >= ACCEPTANCE.big_tumor_mm)
    print(f"      liver Dice {liver:.4f} (target >= {ACCEPTANCE.liver_dice:.2f}), tumor Dice {tumor:.4f}, "
          f"all tumors >= {ACCEPTANCE.big_tumor_mm:.0f} mm found: {'yes' if big_found else 'NO'}")
    (out / "demo.json").write_text(json.dumps({"seed": seed, "liver_dice": liver, "tumor_dice": tumor,
                                               "tumor_matches": matches, FINDINGS_FILE: doc}, indent=2) + "\n")
    ok = doc["findings"]["status"]["reported"] and liver >= ACCEPTANCE.liver_dice and big_found
    print("demo " + ("passed" if ok else "FAILED") + f"; outputs in {out}/result")
    return 0 if ok else 1
