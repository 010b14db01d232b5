"""``make bench`` (second part): each imported model served vs its own predictor, per study, in one run.

    python -m perf.imported [--repeat 1] [--out perf/results] [--readme]

The nnU-Net v2 fixture (tests/fixtures/nnunet, made by nnU-Net's own planner and trainer) is imported with test-time
mirroring, as nnU-Net predicts by default, into a repository beside the shipped model (twice: input in LPS, as the
phantom files are stored, and in RAS, as the real CT file is) and served by the embedded server (cpu flavor). For
each study (unseen phantoms as NIfTI files, TotalSegmentator's real 3 mm CT), one after the other on the same
machine:
  - ``nnUNetPredictor.predict_from_files`` on the CPU: file in, labels file out, as nnU-Net's users run it (its
    worker pools at one process each on this machine), the network and weights already loaded;
  - ``medseg segment --model`` (the user's command: a new process reading the file, the request, the outputs);
  - the in-memory request alone (volume in memory -> labels in memory over gRPC);
and the served labels are compared with the predictor's (Dice per label; the run fails below AGREEMENT_DICE).
Results: ``<out>/<machine-label>/imported.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.nnunet_fixture import RESULTS_FOLDER
from medseg.accuracy.metrics import AGREEMENT_DICE, dice
from medseg.importers.nnunet import import_nnunet
from medseg.paths import MODEL_REPOSITORY, REPO_ROOT
from medseg.serving.server import EmbeddedServer, ServerOptions
from medseg.synth.phantom import generate
from medseg_client.client import SegmentationClient
from medseg_client.io.studies import read_study, write_phantom
from perf.bench import machine_label
from perf.report import update_readme

BEGIN, END = "<!-- bench:imported:begin -->", "<!-- bench:imported:end -->"

NAME = "phantom_nnunet"
SEEDS = (5101, 5102)  # never used in any training
REAL_CT = REPO_ROOT / ".cache" / "realct" / "reference_files" / "example_ct.nii.gz"


def nnunet_predictor() -> Any:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
                        device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(RESULTS_FOLDER), use_folds=("0",), checkpoint_name="checkpoint_final.pth")
    return p


def time_nnunet(predictor: Any, source: Path, out: Path, repeat: int) -> tuple[list[float], np.ndarray]:
    """Wall times of nnU-Net's file-to-file prediction and its labels ((z, y, x) as SimpleITK reads them)."""
    import SimpleITK as sitk

    times = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        predictor.predict_from_files([[str(source)]], [str(out / "labels")], save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
        times.append(time.perf_counter() - t0)
    return times, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))


def time_command(url: str, model: str, source: Path, out: Path, repeat: int) -> tuple[list[float], np.ndarray]:
    """Wall times of `medseg segment --model` as a user runs it, and its labels ((z, y, x) of the file's voxels)."""
    import nibabel as nib

    times = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "medseg_client.cli", "segment", "--url", url, "--model", model,
                              str(source), "--out", str(out)], capture_output=True, text=True, timeout=1800)
        times.append(time.perf_counter() - t0)
        if run.returncode not in (0, 1):
            raise SystemExit(f"medseg segment failed ({run.returncode}): {run.stderr.strip()}")
    return times, np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj).transpose(2, 1, 0)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results")
    ap.add_argument("--readme", action="store_true", help="copy the report's table into README.md")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medseg-bench-imported-") as tmp:
        work = Path(tmp)
        repo = work / "model_repository"
        shutil.copytree(MODEL_REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
        # nnU-Net predicts a file's voxels as stored: each study goes to the import whose orientation is its file's
        card = import_nnunet(RESULTS_FOLDER, NAME, repo)
        import_nnunet(RESULTS_FOLDER, f"{NAME}_ras", repo, orientation="RAS")
        studies = []
        for seed in SEEDS:
            write_phantom(generate(seed), work / f"phantom_{seed}", "nifti")
            studies.append((f"phantom {seed}", work / f"phantom_{seed}" / "ct.nii.gz", NAME))
        if REAL_CT.is_file():
            studies.append(("TotalSegmentator example_ct (real, 3 mm, stored RAS)", REAL_CT, f"{NAME}_ras"))
        predictor = nnunet_predictor()
        for what, source, _ in studies:  # nnU-Net first, alone on the machine
            t, labels = time_nnunet(predictor, source, work / "nnunet_out", args.repeat)
            study = read_study(source)
            rows.append({"study": what, "shape_zyx": list(study.ct.shape),
                         "spacing_zyx_mm": [round(s, 3) for s in study.spacing], "nnunet_predictor_s": t,
                         "_oracle": labels})
        del predictor
        with EmbeddedServer(ServerOptions(grpc_port=0, http_port=0, metrics_port=0, model_repository=repo)) as server:
            for row, (_, source, model) in zip(rows, studies, strict=True):
                with SegmentationClient(server.grpc_url, model_name=model) as client:
                    client.wait_until_ready(300)
                    t_cmd, labels = time_command(server.grpc_url, model, source, work / "medseg_out", args.repeat)
                    study = read_study(source)
                    t_req = []
                    for _ in range(args.repeat):
                        t0 = time.perf_counter()
                        client.segment(study.ct, study.spacing)
                        t_req.append(time.perf_counter() - t0)
                    oracle = row.pop("_oracle")
                    row["served_model"] = model
                    scores = {lab.name: round(dice(labels == lab.value, oracle == lab.value), 4)
                              for lab in card.labels[1:] if (oracle == lab.value).any() or (labels == lab.value).any()}
                    row.update({"medseg_segment_command_s": t_cmd, "medseg_request_s": t_req, "dice_vs_predictor": scores})
                    if scores and min(scores.values()) < AGREEMENT_DICE:
                        raise SystemExit(f"{row['study']}: served labels differ from nnU-Net's predictor: {scores}")
    out = args.out / machine_label()
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for key in ("nnunet_predictor_s", "medseg_segment_command_s", "medseg_request_s"):
            row[key] = [round(v, 3) for v in row[key]]
    (out / "imported.json").write_text(json.dumps({"model": NAME, "card": json.loads(card.to_json()), "rows": rows},
                                                  indent=2) + "\n")
    lines = [f"# Imported nnU-Net v2 model vs nnUNetPredictor ({machine_label()}, cpu flavor, median of {args.repeat})",
             "", BEGIN, "",
             "| study | voxels (z, y, x) | nnUNetPredictor file->file | `medseg segment --model` | request in memory "
             "| speed-up (command) | Dice vs predictor |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        nn, cmd, req = (statistics.median(row[k]) for k in ("nnunet_predictor_s", "medseg_segment_command_s",
                                                              "medseg_request_s"))
        lines.append(f"| {row['study']} | {' x '.join(map(str, row['shape_zyx']))} | {nn:.1f} s | {cmd:.1f} s | "
                     f"{req:.1f} s | {nn / cmd:.2f}x | {', '.join(f'{k} {v:.4f}' for k, v in row['dice_vs_predictor'].items())} |")
    lines += ["", f"Model: {card.description}; patch {card.inference.patch}, mirroring {card.inference.mirror_axes}; "
              f"measured by `make bench` (`python -m perf.imported`) on {machine_label()} (cpu flavor) on "
              f"{time.strftime('%Y-%m-%d')}; medians of {args.repeat} runs. nnUNetPredictor: file in, labels file out "
              "(its worker pools at 1 process), network already loaded; `medseg segment --model`: the user's command in "
              "a new process against the warm server; request in memory: the client's call alone.", "", END]
    (out / "imported.md").write_text("\n".join(lines) + "\n")
    if args.readme:
        update_readme(REPO_ROOT / "README.md", out / "imported.md", BEGIN, END)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
