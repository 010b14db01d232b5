"""``make accuracy``: the acceptance run whose figures the README's accuracy table shows.

    python -m export.evaluate [--readme] [--out perf/results] [--cache .cache/acceptance] [--realct DIR]

1. Writes the acceptance data sets into the git-ignored cache ``.cache/acceptance/`` (each rebuilt only when it
   is missing or when what it is made from changed: the phantom generator's version, the seeds, the real CT files'
   sha256, this module's layout; ``manifest.json`` records them):
   - ``phantoms/``: the 8 unseen phantoms (seeds 5002-5009, ``tests.conftest.EVAL_SEEDS``; abdomen, full size),
     nnU-Net layout (``imagesTs/<case>_0000.nii.gz``, ``labelsTs/<case>.nii.gz``; 0 background, 1 liver, 2 tumor);
   - ``negatives/``: one phantom per region without a liver in view (seeds 6000 + index, as tests/test_accuracy.py)
     and a noise volume, all annotated 0. ``liver_tip`` holds a sliver of liver at the end of the scan: it is
     annotated 0 too, because a liver mostly out of view must not be reported;
   - ``realct/``: TotalSegmentator 2.18.0's reference files (``make realct``; Apache-2.0; development and
     acceptance data, NEVER training data): ``nifti/`` holds example_ct.nii.gz with TotalSegmentator's liver
     (label 5 -> 1) on its top 30 slices, every other slice 255 (ignored), and the MR volume example_mr_sm.nii.gz
     annotated 0 (not CT: it must be refused); ``dicom/`` holds the DICOM series example_ct_dicom with a DICOM SEG
     of TotalSegmentator's liver label (example_seg_dicom.nii.gz, put on the series' grid through its own affine).
     Tumors are not annotated there: those cases are judged with ``--label-map liver=1``, so reported tumors count
     as unverified, and their reported tumor burden is stated.
2. Starts the embedded Triton server (cpu flavor) once and judges the model as served on each set with
   ``medseg evaluate``'s own functions (``medseg_client.evaluate``: the client of ``medseg segment``), each report
   (metrics.json, report.md, froc.png, dice.png, worst/) into ``<out>/<machine>/accuracy/<set>/``.
3. Writes ``<out>/<machine>/accuracy/README.md`` (with ``data.json``, the data sets' manifest): one table over
   the sets, each figure with its data, machine and date, and the acceptance bars (``medseg.accuracy.metrics.ACCEPTANCE``)
   each stated met or not as computed; ``--readme`` copies its block into README.md between the accuracy markers.

Exits 0 when it ran, whatever the figures (the table says which bars are met); 2 with one line when it cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.accuracy.metrics import ACCEPTANCE, BIG
from medseg.model.network import sha256_of
from medseg.paths import REPO_ROOT
from medseg_client.errors import MedsegError

if TYPE_CHECKING:
    from medseg_client.io.studies import Study

EVAL_SEEDS = tuple(range(5002, 5010))  # = tests.conftest.EVAL_SEEDS (a test holds them equal)
NEGATIVE_REGIONS = ("head", "neck", "chest", "pelvis", "legs", "no_liver", "liver_tip")  # = tests/test_accuracy.py's
NEGATIVE_SEED = 6000  # + the region's index, as tests/test_accuracy.py
NOISE_SEED = 6100
LAYOUT = 1  # how this module writes the data sets: bump it when that changes, and the cache is rebuilt
IGNORE = 255  # the value of example_ct's unlabelled slices

# TotalSegmentator's reference files (tests/realct.py describes them; a test holds these names equal)
REALCT_CT, REALCT_CT_LABELS, REALCT_MR = "example_ct.nii.gz", "example_seg.nii.gz", "example_mr_sm.nii.gz"
REALCT_DICOM, REALCT_DICOM_LABELS = "example_ct_dicom", "example_seg_dicom.nii.gz"
REALCT_LIVER = 5  # TotalSegmentator's label number of the liver
REALCT_LABELLED_SLICES = 30  # example_seg.nii.gz labels example_ct's top 30 slices (third voxel axis)
REALCT_SEG_FILE = "liver_seg.dcm"

DEFAULT_CACHE = REPO_ROOT / ".cache" / "acceptance"
DEFAULT_REALCT = Path(os.environ.get("MEDSEG_REALCT") or REPO_ROOT / ".cache" / "realct") / "reference_files"  # as tests/realct.py
MANIFEST, DATA_FILE, README_FILE = "manifest.json", "data.json", "README.md"
BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
PLACEHOLDER = "Figures to come: `make accuracy` writes them here (`perf/results/<machine>/accuracy/`)."
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class AcceptanceError(MedsegError):
    """The acceptance run cannot run: says what is missing."""


@dataclass(frozen=True)
class EvalSet:
    """One evaluation run: its data folder under the cache and report folder under accuracy/ (both ``name``)."""

    name: str
    group: str  # the cached data set it belongs to: phantoms, negatives, realct
    title: str  # in the table
    label_map: tuple[str, ...] | None  # ``--label-map`` items; None: this project's values (1 liver, 2 tumor)
    ignore_label: int | None = None


SETS = (
    EvalSet("phantoms", "phantoms", "phantoms", None),
    EvalSet("negatives", "negatives", "negatives", None),
    EvalSet("realct/nifti", "realct", "real CT", ("liver=1",), IGNORE),  # example_ct (partly labelled) and the MR
    EvalSet("realct/dicom", "realct", "real CT", ("liver=1",)),  # a DICOM SEG has no ignore value: a run of its own
)


# ------------------------------------------------------------------------------------------ the data sets


def _save_pair(folder: Path, case: str, volume_zyx: np.ndarray, labels_zyx: np.ndarray, affine_lps: np.ndarray) -> None:
    """A canonical (z, y, x) volume and its labels as an nnU-Net case, through the (x, y, z) -> LPS affine."""
    from medseg_client.io.studies import save_nifti

    affine_ras = _RAS_FROM_LPS @ affine_lps
    save_nifti(np.ascontiguousarray(volume_zyx.transpose(2, 1, 0)), affine_ras, folder / "imagesTs" / f"{case}_0000.nii.gz")
    save_nifti(np.ascontiguousarray(labels_zyx.astype(np.uint8).transpose(2, 1, 0)), affine_ras,
               folder / "labelsTs" / f"{case}.nii.gz")


def _nnunet_dirs(folder: Path) -> None:
    (folder / "imagesTs").mkdir(parents=True)
    (folder / "labelsTs").mkdir()


def build_phantoms(folder: Path) -> dict[str, Any]:
    """The unseen phantoms, their labels as generated."""
    from medseg.synth.phantom import generate

    _nnunet_dirs(folder)
    cases = {}
    for seed in EVAL_SEEDS:
        ph = generate(seed)
        case = f"phantom_{seed}"
        _save_pair(folder, case, ph.ct, ph.labels, ph.affine_lps())
        cases[case] = {"description": f"phantom seed {seed}", "phantom": ph.describe()}
    return {"description": f"{len(EVAL_SEEDS)} unseen phantoms, seeds {EVAL_SEEDS[0]}-{EVAL_SEEDS[-1]} (abdomen, full size)",
            "cases": cases}


def noise_affine_lps(spacing_zyx: Sequence[float]) -> np.ndarray:
    """An axis-aligned (x, y, z) index -> LPS affine of the given spacing, origin 0."""
    return np.diag([float(spacing_zyx[2]), float(spacing_zyx[1]), float(spacing_zyx[0]), 1.0])


def build_negatives(folder: Path) -> dict[str, Any]:
    """A phantom per region without a liver in view, and a noise volume: every label 0."""
    from medseg.synth.phantom import generate, noise_volume

    _nnunet_dirs(folder)
    cases = {}
    for i, region in enumerate(NEGATIVE_REGIONS):
        seed = NEGATIVE_SEED + i
        ph = generate(seed, region=region)
        case = f"{region}_{seed}"
        _save_pair(folder, case, ph.ct, np.zeros(ph.labels.shape, np.uint8), ph.affine_lps())
        in_view_ml = float(np.count_nonzero(ph.labels)) * float(np.prod(ph.spacing)) / 1000.0
        description = f"{region} phantom, seed {seed}"
        if in_view_ml > 0:
            description += (f" ({in_view_ml:.0f} mL of liver at the scan's end, annotated as none: a liver mostly "
                            "out of view must not be reported)")
        cases[case] = {"description": description, "liver_in_view_ml": round(in_view_ml, 1), "phantom": ph.describe()}
    ct, spacing = noise_volume(NOISE_SEED)
    _save_pair(folder, f"noise_{NOISE_SEED}", ct, np.zeros(ct.shape, np.uint8), noise_affine_lps(spacing))
    cases[f"noise_{NOISE_SEED}"] = {"description": f"random values over the CT range, seed {NOISE_SEED}",
                                    "shape_zyx": list(ct.shape), "spacing_zyx_mm": list(spacing)}
    return {"description": f"{len(NEGATIVE_REGIONS)} phantoms without a liver in view (seeds {NEGATIVE_SEED}-"
                           f"{NEGATIVE_SEED + len(NEGATIVE_REGIONS) - 1}) and a noise volume, all annotated 0",
            "cases": cases}


def example_ct_labels(seg: np.ndarray, ct_shape: Sequence[int]) -> np.ndarray:
    """example_ct's labels in its own (i, j, k) order: TotalSegmentator's liver (5) -> 1 and its other labels -> 0 on
    the top ``REALCT_LABELLED_SLICES`` slices along k, every other slice ``IGNORE``."""
    shape = tuple(int(n) for n in ct_shape)
    expected = (*shape[:2], REALCT_LABELLED_SLICES)
    if len(shape) != 3 or tuple(seg.shape) != expected:
        raise AcceptanceError(f"{REALCT_CT_LABELS} has shape {tuple(seg.shape)}, expected {expected}: the labels of "
                              f"the top {REALCT_LABELLED_SLICES} slices of {REALCT_CT} {shape}")
    out = np.full(shape, IGNORE, np.uint8)
    out[:, :, shape[2] - REALCT_LABELLED_SLICES :] = (seg == REALCT_LIVER).astype(np.uint8)
    return out


def on_study_grid(values_native: np.ndarray, affine_ras: np.ndarray, study: Study, atol_mm: float = 0.05) -> np.ndarray:
    """A label volume with its own RAS affine onto the study's canonical (z, y, x) grid, reoriented as the reader
    reorients a NIfTI (``medseg_client.io.studies._canonical``); refused unless it lands on the study's voxels."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(affine_ras), axcodes2ornt(("L", "P", "S")))
    canon = np.ascontiguousarray(apply_orientation(values_native, ornt).transpose(2, 1, 0))
    affine_lps = _RAS_FROM_LPS @ np.asarray(affine_ras, float) @ inv_ornt_aff(ornt, values_native.shape)
    if canon.shape != study.ct.shape or not np.allclose(affine_lps, study.affine_lps, atol=atol_mm, rtol=0):
        diff = float(np.abs(affine_lps - study.affine_lps).max()) if canon.shape == study.ct.shape else float("nan")
        raise AcceptanceError(f"labels of shape {canon.shape} do not land on the study's grid {study.ct.shape} "
                              f"(affines differ by up to {diff:.3g} mm)")
    return canon


def build_realct(folder: Path, source: Path) -> dict[str, Any]:
    """TotalSegmentator's example CT (NIfTI, partly labelled), its MR volume (annotated 0) and its DICOM series
    with a SEG of its liver label."""
    import nibabel as nib

    from medseg_client.io.seg import write_seg
    from medseg_client.io.studies import read_study, save_nifti

    nifti, dicom = folder / "nifti", folder / "dicom"
    _nnunet_dirs(nifti)
    ct_img: Any = nib.load(str(source / REALCT_CT))
    seg_img: Any = nib.load(str(source / REALCT_CT_LABELS))
    seg = np.asanyarray(seg_img.dataobj)
    shutil.copyfile(source / REALCT_CT, nifti / "imagesTs" / "example_ct_0000.nii.gz")
    save_nifti(example_ct_labels(seg, ct_img.shape), ct_img.affine, nifti / "labelsTs" / "example_ct.nii.gz")
    mr_img: Any = nib.load(str(source / REALCT_MR))
    shutil.copyfile(source / REALCT_MR, nifti / "imagesTs" / "example_mr_sm_0000.nii.gz")
    save_nifti(np.zeros(mr_img.shape[:3], np.uint8), mr_img.affine, nifti / "labelsTs" / "example_mr_sm.nii.gz")

    series = dicom / REALCT_DICOM
    shutil.copytree(source / REALCT_DICOM, series)
    study = read_study(series)
    labels_img: Any = nib.load(str(source / REALCT_DICOM_LABELS))
    values = np.asanyarray(labels_img.dataobj)
    liver = on_study_grid(values, np.asarray(labels_img.affine, float), study) == REALCT_LIVER
    write_seg(series / REALCT_SEG_FILE, study.dicom_files, study.to_native(liver.astype(np.uint8)), {})
    return {"description": "TotalSegmentator 2.18.0's reference files (`make realct`, Apache-2.0; never training "
                           "data); tumors not annotated",
            "cases": {"example_ct": {"description": f"{REALCT_CT}: TotalSegmentator's liver on its top "
                                                    f"{REALCT_LABELLED_SLICES} slices, the other slices ignored"},
                      "example_mr_sm": {"description": f"{REALCT_MR}: an MR volume, not CT, annotated 0"},
                      REALCT_DICOM: {"description": f"{REALCT_DICOM}/: the DICOM series with a SEG of "
                                                    f"{REALCT_DICOM_LABELS}'s liver"}}}


def data_keys(realct: Path) -> dict[str, dict[str, Any]]:
    """What each cached data set is made from: a cached set whose key differs is rebuilt."""
    from medseg.synth.phantom import GENERATOR_VERSION

    sources = [realct / REALCT_CT, realct / REALCT_CT_LABELS, realct / REALCT_MR, realct / REALCT_DICOM_LABELS]
    missing = [p for p in [*sources, realct / REALCT_DICOM] if not p.exists()]
    if missing:
        raise AcceptanceError(f"{missing[0]} is missing: run `make realct` (TotalSegmentator's reference files)")
    files = sorted([*sources, *(p for p in (realct / REALCT_DICOM).iterdir() if p.is_file())])
    return {
        "phantoms": {"layout": LAYOUT, "generator_version": GENERATOR_VERSION, "seeds": list(EVAL_SEEDS)},
        "negatives": {"layout": LAYOUT, "generator_version": GENERATOR_VERSION, "seed": NEGATIVE_SEED,
                      "regions": list(NEGATIVE_REGIONS), "noise_seed": NOISE_SEED},
        "realct": {"layout": LAYOUT, "sha256": {str(p.relative_to(realct)): sha256_of(p) for p in files}},
    }


def prepare_data(cache: Path, realct: Path) -> dict[str, Any]:
    """Each data set in ``cache``, built where missing or stale; returns the manifest."""
    keys = data_keys(realct)
    cache.mkdir(parents=True, exist_ok=True)
    manifest_path = cache / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except json.JSONDecodeError:
        manifest = {}
    builders = {"phantoms": build_phantoms, "negatives": build_negatives,
                "realct": lambda folder: build_realct(folder, realct)}
    for group, build in builders.items():
        entry, folder = manifest.get(group), cache / group
        if entry and entry.get("key") == keys[group] and folder.is_dir():
            print(f"data: {group} cached in {folder}", flush=True)
            continue
        print(f"data: writing {group} into {folder} ...", flush=True)
        t0 = time.perf_counter()
        staging = cache / f".{group}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            described = build(staging)
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        manifest[group] = {"key": keys[group], **described}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"data: {group} written in {time.perf_counter() - t0:.0f} s", flush=True)
    return manifest


# -------------------------------------------------------------------------------------------------- the run


def run_sets(url: str, cache: Path, accuracy: Path) -> dict[str, dict[str, Any]]:
    """``medseg evaluate`` of every set through the server at ``url``; the metrics documents by set."""
    from medseg.accuracy.evaluate import evaluate_to_dir, parse_label_map, summary_lines

    docs = {}
    for s in SETS:
        label_map = parse_label_map(s.label_map) if s.label_map else None
        print(f"evaluate: {s.name}", flush=True)
        docs[s.name] = evaluate_to_dir(url, cache / s.name, accuracy / s.name, label_map=label_map,
                                       ignore_label=s.ignore_label)
        print(summary_lines(docs[s.name]), flush=True)
    return docs


def load_results(accuracy: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The committed metrics.json of each set under ``accuracy`` (those present) and its data.json."""
    docs = {s.name: json.loads((accuracy / s.name / "metrics.json").read_text())
            for s in SETS if (accuracy / s.name / "metrics.json").is_file()}
    data_path = accuracy / DATA_FILE
    data = json.loads(data_path.read_text()) if data_path.is_file() else {}
    return docs, data


# ------------------------------------------------------------------------------------------------ the table


def _met(ok: bool | None) -> str:
    return "-" if ok is None else "met" if ok else "**NOT met**"


def _nothing_reported(r: dict[str, Any]) -> bool:
    """A case whose served result holds no liver and no tumor and whose status says it reported nothing."""
    return not r["status"]["reported"] and not r["liver"]["false_liver"] and not r["tumors"]["reported"]


def block_lines(docs: dict[str, dict[str, Any]], data: dict[str, Any], machine: str) -> list[str]:
    """The accuracy block (markers included) of the metrics documents by set, their data sets' manifest and the
    machine's name: a row per figure with its bar, whether it is met (computed), its data, machine and date."""
    from medseg.accuracy.evaluate import _cell

    described = data.get("sets", {})
    lines = [BEGIN, "| set | figure | value | bar | | data | machine, date |", "|---|---|---|---|---|---|---|"]
    verdicts: list[bool] = []

    def measured(doc: dict[str, Any]) -> str:
        return f"{machine} ({doc['machine']['cpu_count']} cores), {doc['date'][:10]}"

    def case_data(group: str, case: str) -> str:
        return str(described.get(group, {}).get("cases", {}).get(case, {}).get("description", case))

    def row(title: str, figure: str, value: str, bar: str, ok: bool | None, data_text: str, doc: dict[str, Any]) -> None:
        if ok is not None:
            verdicts.append(ok)
        lines.append(f"| {title} | {_cell(figure)} | {_cell(value)} | {_cell(bar)} | {_met(ok)} | {_cell(data_text)} | "
                     f"{measured(doc)} |")

    liver_bar = f"liver Dice >= {ACCEPTANCE.liver_dice:.2f}"
    doc = docs.get("phantoms")
    if doc:
        s = doc["summary"]
        ld, big, small = s["liver_dice"], s["tumors"][BIG], s["tumors"]["5_to_10mm"]
        data_text = (f"{described.get('phantoms', {}).get('description', 'phantoms')}: {s['evaluated']} of "
                     f"{s['cases']} evaluated")
        every = ld["n"] == s["cases"] and ld["min"] is not None
        row("phantoms", "liver Dice min / mean", "-" if ld["min"] is None else f"{ld['min']:.3f} / {ld['mean']:.3f}"
            + (f" ({s['errors']} errors)" if s["errors"] else ""), f"{liver_bar} in every study",
            every and ld["min"] >= ACCEPTANCE.liver_dice, data_text, doc)
        row("phantoms", f"tumors >= {ACCEPTANCE.big_tumor_mm:g} mm found", f"{big['found']}/{big['total']}",
            f">= {ACCEPTANCE.big_tumor_sensitivity:.0%} found",
            None if not big["total"] else big["sensitivity"] >= ACCEPTANCE.big_tumor_sensitivity, data_text, doc)
        row("phantoms", "tumors 5-10 mm found", f"{small['found']}/{small['total']}", "-", None, data_text, doc)
        per = s["false_tumors_per_scan"]
        row("phantoms", "false tumors per study", "-" if per is None else
            f"{per:.2f} ({s['false_tumors']} in {s['tumor_annotated_cases']} studies)",
            f"<= {ACCEPTANCE.false_tumors_per_study:.2f}", None if per is None else per <= ACCEPTANCE.false_tumors_per_study,
            data_text, doc)
        row("phantoms", "statuses", ", ".join(f"`{k}` {v}" for k, v in s["statuses"].items()) or "-", "-", None,
            data_text, doc)
    doc = docs.get("negatives")
    if doc:
        for r in doc["cases"]:
            data_text = case_data("negatives", r["case"])
            if r.get("error"):
                row("negatives", f"{r['case']}: status; nothing reported", f"error ({r['stage']}): {r['error']}",
                    "nothing reported", False, data_text, doc)
                continue
            nothing = _nothing_reported(r)
            row("negatives", f"{r['case']}: status; nothing reported", f"`{r['status']['code']}`; "
                f"{'yes' if nothing else 'no'}", "nothing reported", nothing, data_text, doc)
    for doc in (docs[s.name] for s in SETS if s.group == "realct" and s.name in docs):
        for r in doc["cases"]:
            data_text = case_data("realct", r["case"])
            if r.get("error"):
                row("real CT", r["case"], f"error ({r['stage']}): {r['error']}", "-", False, data_text, doc)
                continue
            t, liver = r["tumors"], r["liver"]
            burden = t["reported_burden_ml"]
            tail = f"tumor burden {'-' if burden is None else f'{burden:.2f}'} mL; {t['unverified']} unverified tumors"
            if liver["annotated"]:
                row("real CT", f"{r['case']}: status; liver Dice (labelled part); reported tumor burden; unverified "
                    "tumors", f"`{r['status']['code']}`; {liver['dice']:.3f}; {tail}", liver_bar,
                    liver["dice"] >= ACCEPTANCE.liver_dice, data_text, doc)
            else:
                nothing = _nothing_reported(r)
                row("real CT", f"{r['case']}: status; nothing reported; reported tumor burden; unverified tumors",
                    f"`{r['status']['code']}`; {'yes' if nothing else 'no'}; {tail}", "nothing reported (no liver "
                    "annotated)", nothing, data_text, doc)
    missing = [s.name for s in SETS if s.name not in docs]
    models = {json.dumps(d["server"].get("model"), sort_keys=True) for d in docs.values()}
    model = next((d["server"]["model"] for d in docs.values() if d["server"].get("model")), None) or {}
    lines += ["", f"Bars (`medseg.accuracy.metrics.ACCEPTANCE`): {sum(verdicts)} of {len(verdicts)} met."
              + (f" Sets not run: {', '.join(missing)}." if missing else ""),
              "",
              f"Model `{model.get('ensemble', '?')}` version {model.get('version', '?')}, weights sha256 "
              f"`{str(model.get('weights_sha256', '?'))[:16]}`" + ("" if len(models) <= 1 else " (NOT the same model "
                                                                     "in every set)")
              + f", served by the embedded Triton server ({data.get('flavor', '?')} flavor) and judged by "
              "`medseg evaluate`'s functions; measured by `make accuracy` (`python -m export.evaluate`). Per-set "
              f"reports: `perf/results/{machine}/accuracy/<set>/report.md`. Negatives: a scan holding only the tip "
              "of the liver is annotated as no liver, because a liver mostly out of view must not be reported. Real "
              "CT: TotalSegmentator's reference files (never training data) annotate no tumors, so reported tumors "
              "are unverified (neither true nor false); example_ct's liver Dice is over its labelled top slices; the "
              "MR volume must be refused as not CT.",
              END]
    return lines


def block(text: str) -> str:
    """The accuracy block (markers included) of a markdown text; raises ValueError if it has none."""
    found = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), text, flags=re.S)
    if not found:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return found.group(0)


def readme_of(accuracy: Path) -> str:
    """accuracy/README.md of the results in ``accuracy`` (<out>/<machine>/accuracy)."""
    docs, data = load_results(accuracy)
    machine = accuracy.parent.name
    wall = data.get("wall_s")
    return "\n".join([f"# Acceptance run: {machine}", "",
                      "What the README's accuracy table is made of: `make accuracy` (`python -m export.evaluate`), "
                      "each set judged through the served model by `medseg evaluate` (its report.md, metrics.json, "
                      "froc.png, dice.png and worst/ in the set's folder; the data sets in `data.json`)"
                      + (f"; whole run {wall:.0f} s." if wall else "."), "",
                      *block_lines(docs, data, machine), ""])


def update_readme(readme: Path, accuracy_readme: Path) -> None:
    """Replace README.md's accuracy block with the accuracy report's."""
    text = readme.read_text()
    readme.write_text(text.replace(block(text), block(accuracy_readme.read_text())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results", help="results root (default perf/results)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the data sets are written")
    ap.add_argument("--realct", type=Path, default=DEFAULT_REALCT, help="TotalSegmentator's reference_files (make realct)")
    ap.add_argument("--readme", action="store_true", help="copy the table into README.md between the accuracy markers")
    args = ap.parse_args(argv)
    from medseg.serving.server import EmbeddedServer, ServerOptions
    from perf.bench import machine_label

    t0 = time.perf_counter()
    try:
        manifest = prepare_data(args.cache, args.realct)
        accuracy = args.out / machine_label() / "accuracy"
        with EmbeddedServer(ServerOptions(grpc_port=0, http_port=0, metrics_port=0)) as server:
            run_sets(server.grpc_url, args.cache, accuracy)
    except MedsegError as e:
        print(f"export.evaluate: {e}", file=sys.stderr)
        return 2
    data = {"schema": "medseg-acceptance/1", "flavor": ServerOptions().flavor, "wall_s": round(time.perf_counter() - t0, 1),
            "sets": manifest}
    (accuracy / DATA_FILE).write_text(json.dumps(data, indent=2) + "\n")
    (accuracy / README_FILE).write_text(readme_of(accuracy))
    if args.readme:
        update_readme(REPO_ROOT / "README.md", accuracy / README_FILE)
    print("\n".join(block_lines(*load_results(accuracy), accuracy.parent.name)[1:-1]))
    print(f"wrote {accuracy} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
