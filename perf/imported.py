"""``make bench`` (second part): each imported model served vs its own predictor, per study, in one run.

    python -m perf.imported [--repeat 1] [--out perf/results] [--readme]

The nnU-Net v2 fixture (tests/fixtures/nnunet, made by nnU-Net's own planner and trainer) is imported with test-time
mirroring, as nnU-Net predicts by default (twice: input in LPS, as the phantom files are stored, and in RAS, as the
real CT file is), and the MONAI bundle fixture (tests/fixtures/monai_bundle) as its inference.json says, into a
repository beside the shipped model, served by the embedded server (cpu flavor). For each study (unseen phantoms
as NIfTI files, TotalSegmentator's real 3 mm CT), one after the other on the same machine:
  - the model's own predictor on the CPU, file in, labels file out, as its users run it:
    ``nnUNetPredictor.predict_from_files`` (its worker pools at one process each on this machine, the network and
    weights already loaded), and MONAI's bundle runner (``python -m monai.bundle run`` over a folder holding the
    study: a new process, as the bundle's users run it);
  - ``medseg segment --model`` (the user's command: a new process reading the file, the request, the outputs);
  - the in-memory request alone (volume in memory -> labels in memory over gRPC);
and the served labels are compared with the predictor's (Dice per label; the run fails below AGREEMENT_DICE).
Results: ``<out>/<machine-label>/imported.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
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

from export.monai_bundle_fixture import BUNDLE
from export.nnunet_fixture import RESULTS_FOLDER
from medseg.accuracy.metrics import AGREEMENT_DICE, dice
from medseg.importers.monai_bundle import import_monai_bundle
from medseg.importers.nnunet import import_nnunet
from medseg.paths import MODEL_REPOSITORY, REPO_ROOT
from medseg.serving.server import EmbeddedServer, ServerOptions
from medseg.synth.phantom import generate
from medseg_client.client import SegmentationClient
from medseg_client.io.studies import Study, read_study, write_phantom
from perf.bench import machine_label
from perf.command import REAL_CT, medseg_runs
from perf.report import update_readme

BEGIN, END = "<!-- bench:imported:begin -->", "<!-- bench:imported:end -->"

NAME, MONAI_NAME = "phantom_nnunet", "phantom_monai"
SEEDS = (5101, 5102)  # never used in any training


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


def time_bundle_runner(source: Path, out: Path, repeat: int) -> tuple[list[float], np.ndarray]:
    """Wall times of MONAI's bundle runner on a folder holding just this study, and its labels ((z, y, x) of the
    file's voxels)."""
    import nibabel as nib

    times = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        (out / "in").mkdir(parents=True)
        (out / "in" / source.name).symlink_to(source)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                              str(BUNDLE / "configs" / "inference.json"), "--bundle_root", str(BUNDLE),
                              "--dataset_dir", str(out / "in"), "--output_dir", str(out / "out")],
                             capture_output=True, text=True, timeout=3600)
        times.append(time.perf_counter() - t0)
        if run.returncode != 0:
            raise SystemExit(f"the bundle runner failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    labels = nib.load(str(out / "out" / f"{source.name.removesuffix('.nii.gz')}_seg.nii.gz"))
    return times, np.asarray(labels.dataobj).reshape(nib.load(str(source)).shape).transpose(2, 1, 0)  # type: ignore[attr-defined]


def time_command(url: str, model: str, source: Path, out: Path, repeat: int) -> tuple[list[float], np.ndarray]:
    """Wall times of `medseg segment --model` as a user runs it, and its labels ((z, y, x) of the file's voxels)."""
    import nibabel as nib

    times = [r["wall_s"] for r in medseg_runs(url, source, out, repeat, ("--model", model))]
    return times, np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj).transpose(2, 1, 0)  # type: ignore[attr-defined]


@functools.cache
def _study(source: Path) -> Study:
    """Each study file read once for the whole run (its shape for the table, its volume for the in-memory request)."""
    return read_study(source)


def _geometry(what: str, source: Path) -> dict[str, Any]:
    study = _study(source)
    return {"study": what, "shape_zyx": list(study.ct.shape), "spacing_zyx_mm": [round(s, 3) for s in study.spacing]}


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
        bundle_card = import_monai_bundle(BUNDLE, MONAI_NAME, repo)
        cards = {NAME: card, f"{NAME}_ras": card, MONAI_NAME: bundle_card}
        predictor = nnunet_predictor()
        for what, source, model in studies:  # the own predictors first, alone on the machine
            t, labels = time_nnunet(predictor, source, work / "nnunet_out", args.repeat)
            rows.append({**_geometry(what, source), "framework": "nnU-Net v2", "own_predictor": "nnUNetPredictor",
                         "served_model": model, "own_predictor_s": t, "_oracle": labels, "_source": source})
        del predictor
        for what, source, _ in studies:
            t, labels = time_bundle_runner(source, work / "bundle_out", args.repeat)
            rows.append({**_geometry(what, source), "framework": "MONAI bundle", "own_predictor": "monai.bundle run",
                         "served_model": MONAI_NAME, "own_predictor_s": t, "_oracle": labels, "_source": source})
        with EmbeddedServer(ServerOptions(grpc_port=0, http_port=0, metrics_port=0, model_repository=repo)) as server:
            for row in rows:
                model, source = row["served_model"], row.pop("_source")
                with SegmentationClient(server.grpc_url, model_name=model) as client:
                    client.wait_until_ready(300)
                    t_cmd, labels = time_command(server.grpc_url, model, source, work / "medseg_out", args.repeat)
                    study = _study(source)
                    t_req = []
                    for _ in range(args.repeat):
                        t0 = time.perf_counter()
                        client.segment(study.ct, study.spacing)
                        t_req.append(time.perf_counter() - t0)
                    oracle = row.pop("_oracle")
                    scores = {lab.name: round(dice(labels == lab.value, oracle == lab.value), 4)
                              for lab in cards[model].labels[1:] if (oracle == lab.value).any() or (labels == lab.value).any()}
                    row.update({"medseg_segment_command_s": t_cmd, "medseg_request_s": t_req, "dice_vs_predictor": scores})
                    if scores and min(scores.values()) < AGREEMENT_DICE:
                        raise SystemExit(f"{row['study']} ({model}): served labels differ from "
                                         f"{row['own_predictor']}'s: {scores}")
    out = args.out / machine_label()
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for key in ("own_predictor_s", "medseg_segment_command_s", "medseg_request_s"):
            row[key] = [round(v, 3) for v in row[key]]
    (out / "imported.json").write_text(json.dumps({"models": {NAME: json.loads(card.to_json()),
                                                              MONAI_NAME: json.loads(bundle_card.to_json())},
                                                   "rows": rows}, indent=2) + "\n")
    runs = "one run" if args.repeat == 1 else f"medians of {args.repeat} runs"
    lines = [f"# Imported models vs their own predictors ({machine_label()}, cpu flavor, {runs})",
             "", BEGIN, "",
             "| imported model | study | voxels (z, y, x) | its own predictor, file->file | `medseg segment --model` "
             "| request in memory | speed-up (command) | Dice vs its predictor |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        own, cmd, req = (statistics.median(row[k]) for k in ("own_predictor_s", "medseg_segment_command_s",
                                                               "medseg_request_s"))
        lines.append(f"| {row['framework']} | {row['study']} | {' x '.join(map(str, row['shape_zyx']))} | "
                     f"{row['own_predictor']}: {own:.1f} s | {cmd:.1f} s | {req:.1f} s | {own / cmd:.2f}x | "
                     f"{', '.join(f'{k} {v:.4f}' for k, v in row['dice_vs_predictor'].items())} |")
    lines += ["", f"Models: {card.description}, patch {card.inference.patch}, mirroring {card.inference.mirror_axes}; "
              f"{bundle_card.description}, ROI {bundle_card.inference.patch}, overlap {1 - bundle_card.inference.step:g}. "
              f"Measured by `make bench` (`python -m perf.imported`) on {machine_label()} (cpu flavor) on "
              f"{time.strftime('%Y-%m-%d')}, {runs}. nnUNetPredictor: file in, labels file out (its worker pools at 1 "
              "process), network already loaded; monai.bundle run: `python -m monai.bundle run` over a folder holding "
              "the study, a new process as the bundle's users run it (its start and network load included); "
              "`medseg segment --model`: the user's command in a new process against the warm server; request in "
              "memory: the client's call alone.", "", END]
    (out / "imported.md").write_text("\n".join(lines) + "\n")
    if args.readme:
        update_readme(REPO_ROOT / "README.md", out / "imported.md", BEGIN, END)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
