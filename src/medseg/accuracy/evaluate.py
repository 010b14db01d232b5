"""``medseg evaluate``: judge the served model on labelled data a hospital has, through the server.

    medseg evaluate -u HOST:PORT DATA --out REPORT_DIR [--label-map liver=1,2 tumor=2] [--ignore-label 255]

DATA is an nnU-Net-style folder (``imagesTs/<case>_0000.nii.gz`` with ``labelsTs/<case>.nii.gz``; ``imagesTr`` /
``labelsTr`` where there is no ``imagesTs``) or DICOM: ``DATA/<case>/`` folders, or DATA itself, each holding a CT
series and a DICOM SEG that references it (one case per SEG). Every case is segmented by the server
(``SegmentationClient``, as ``medseg segment`` does) and compared with its annotation on the study's canonical
(z, y, x) grid, where the served labels and the findings' voxel coordinates live.

The module reads top down: the measures of one case and of a run (pure: arrays and dicts in, dicts out; the tests
import them), the figures and the report (pure but for the files), reading the data (label maps, NIfTI labels,
SEG), and the run that writes REPORT_DIR all or nothing.

Definitions (``DEFINITIONS`` is written into report.md):

- liver = the whole organ, tumors included: liver Dice is served labels > 0 against the annotated liver and tumor
  values; an annotation with no liver and nothing reported is a true negative (Dice 1);
- true tumors: 26-connected components of the annotated tumor label; their size is the longest axial diameter
  (the Feret diameter over axial slices, as the findings measure reported tumors and as RECIST measures), the
  equivalent-sphere diameter is recorded beside it;
- a true tumor is found when a reported tumor's centroid lies within its radius + 5 mm (``medseg.accuracy.metrics``); the
  same rule judges the tumor candidates of the FROC curve (they carry only centroids). A reported tumor that
  reaches no true tumor is false, unless its centroid lies in an ignored voxel; where tumors are not annotated
  every reported tumor is unverified;
- ``--ignore-label V``: voxels annotated V are left out of every voxel measure (Dice, volumes).
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from medseg.accuracy.metrics import ACCEPTANCE, BIG, FROC_SIZES, dice, froc, froc_point, locate_tumors, match_tumors, within_reach
from medseg_client.errors import MedsegError, StudyError, one_line
from medseg_client.spec import SPEC, TUMOR

if TYPE_CHECKING:
    from PIL import Image

    from medseg_client.client import SegmentationClient
    from medseg_client.io.studies import Study

SCHEMA = "medseg-evaluate/1"
_FULL = np.ones((3, 3, 3), bool)  # 26-connectivity
# true tumor sizes by longest axial diameter (mm): key, display, [low, high)
SIZE_BINS = ((BIG, ">= 10 mm", ACCEPTANCE.big_tumor_mm, float("inf")), ("5_to_10mm", "5-10 mm", 5.0, 10.0),
             ("lt_5mm", "< 5 mm", 0.0, 5.0))
WORST_N = 3  # cases shown per criterion in worst/
SEG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}  # Segmentation, Label Map Seg.
METRICS_FILE, REPORT_FILE, FROC_FILE, DICE_FILE, WORST_DIR = "metrics.json", "report.md", "froc.png", "dice.png", "worst"

DEFINITIONS = """\
- **liver Dice**: served labels > 0 against the annotated liver including its tumors, ignored voxels left out;
  its min / mean / median are over the cases whose annotation holds a liver. No annotated liver and nothing
  reported: a true negative (Dice 1); no annotated liver but a liver reported: a false liver (Dice 0).
- **true tumors**: 26-connected components of the annotated tumor label, sized by their longest axial diameter
  (Feret diameter over the axial slices, as the findings measure reported tumors); the equivalent-sphere diameter
  is in metrics.json beside it.
- **found**: a reported tumor's centroid lies within the true tumor's radius + 5 mm (`medseg.accuracy.metrics`).
  **false tumor**: a reported tumor that reaches no true tumor (one whose centroid lies in an ignored voxel is
  not counted). Where tumors are not annotated, reported tumors are **unverified**, neither true nor false.
  The rule reads centroids only, so a reported tumor much larger than the true one it covers can have its centroid
  out of reach: it then counts as false and the true tumor as missed (the tumor Dice shows the overlap).
- **tumor Dice** per case: 1 where neither the annotation nor the server has a tumor (its min / mean / median are
  over the cases with annotated tumors); pooled: over all tumor voxels of those cases together.
- **FROC**: the tumor candidates the server judged (findings `tumor_candidates`) that passed the shape and
  contrast checks, i.e. reported ones and those rejected only by the confidence threshold; at each threshold
  the candidates at or above it count as reported, judged by the same rule; false tumors per scan are over the
  scans whose tumors are annotated. The marked point is what the server reported (its operating threshold).
  Candidates' centroids come from the model grid and reported tumors are measured on the study's grid (where
  a few tiny ones fall under the volume floor), so the marked point and the overall table may differ slightly.
- Sensitivities count true tumors found / all true tumors of that size over the evaluated cases; cases that
  failed to read or were refused are errors, in no figure.
"""


class DataError(MedsegError):
    """Evaluation data or options that cannot be used: says which case or option and why."""


# ---------------------------------------------------------------------------------------------- label maps


@dataclass(frozen=True)
class LabelMap:
    """Which annotated values (label-volume values, or SEG segment numbers) are liver and which tumor."""

    liver: frozenset[int]
    tumor: frozenset[int] | None  # None: tumors are not annotated

    @property
    def organ(self) -> frozenset[int]:
        """The whole organ: liver and tumor values."""
        return self.liver | (self.tumor or frozenset())

    def describe(self) -> dict[str, list[int] | None]:
        return {"liver": sorted(self.liver), "tumor": None if self.tumor is None else sorted(self.tumor)}


DEFAULT_LABEL_MAP = LabelMap(frozenset({1, 2}), frozenset({2}))  # this project's, LiTS' and MSD Task03's values


def parse_label_map(items: Sequence[str]) -> LabelMap:
    """``["liver=1,2", "tumor=2"]`` -> LabelMap. ``liver`` is required; without ``tumor`` tumors are not annotated."""
    found: dict[str, frozenset[int]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in ("liver", "tumor"):
            raise DataError(f"--label-map: expected liver=V[,V...] and optionally tumor=V[,V...], got {item!r} "
                            "(DATA goes before --label-map)")
        if name in found:
            raise DataError(f"--label-map: {name} is given twice")
        try:
            parsed = frozenset(int(v) for v in values.split(","))
        except ValueError:
            raise DataError(f"--label-map {item}: values must be integers separated by commas") from None
        if any(v <= 0 for v in parsed):
            raise DataError(f"--label-map {item}: values must be positive (0 is background)")
        found[name] = parsed
    if "liver" not in found:
        raise DataError("--label-map: liver=V[,V...] is required (the organ; tumor values count as liver too)")
    return LabelMap(found["liver"], found.get("tumor"))


def check_ignore_label(label_map: LabelMap, ignore_label: int | None) -> None:
    if ignore_label is None:
        return
    if ignore_label == 0:
        raise DataError("--ignore-label 0: 0 is background, it cannot be left out")
    if ignore_label in label_map.organ:
        raise DataError(f"--ignore-label {ignore_label} is also a liver or tumor value of the label map "
                        f"{label_map.describe()}")


# ------------------------------------------------------------------------------------ the measures of a case


@dataclass
class Truth:
    """An annotation on the study's canonical (z, y, x) grid."""

    organ: np.ndarray  # bool: liver with its tumors
    tumor: np.ndarray | None  # bool; None: tumors not annotated
    ignore: np.ndarray | None = None  # bool: voxels left out of every voxel measure

    def as_labels(self) -> np.ndarray:
        """This project's label values (0, 1 liver, 2 tumor), for pictures."""
        out = self.organ.astype(np.uint8)
        if self.tumor is not None:
            out[self.tumor] = TUMOR
        return out


def truth_from_values(values: np.ndarray, label_map: LabelMap, ignore_label: int | None = None) -> Truth:
    """Masks of a label volume (any grid) by the label map."""
    ignore = values == ignore_label if ignore_label is not None else None
    return Truth(np.isin(values, sorted(label_map.organ)),
                 None if label_map.tumor is None else np.isin(values, sorted(label_map.tumor)),
                 ignore if ignore is not None and ignore.any() else None)


def size_bin(diameter_mm: float) -> str:
    return next(key for key, _, lo, hi in SIZE_BINS if lo <= diameter_mm < hi)


def true_tumors(tumor: np.ndarray, spacing: Sequence[float], affine_lps: np.ndarray) -> list[dict[str, Any]]:
    """The annotated tumors: 26-connected components of ``tumor`` (z, y, x), largest first, each with its volume,
    longest axial diameter (``diameter_mm``), equivalent-sphere diameter, centroid (voxel and LPS ``center_mm``)."""
    from medseg.ops.postprocess import bounding_box, longest_axial_diameter

    if not tumor.any():
        return []
    box = bounding_box(tumor)
    offset = np.array([s.start for s in box], float)
    comp, n = ndimage.label(tumor[box], structure=_FULL)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    out = []
    for i, obj in enumerate(ndimage.find_objects(comp), start=1):
        m = comp[obj] == i
        centroid = np.argwhere(m).mean(axis=0) + [s.start for s in obj] + offset
        volume = float(sizes[i]) * voxel_mm3
        diameter = longest_axial_diameter(m, spacing)
        out.append({"volume_ml": round(volume / 1000.0, 3), "diameter_mm": round(diameter, 1),
                    "equivalent_diameter_mm": round((6.0 * volume / np.pi) ** (1 / 3), 1),
                    "centroid_voxel_zyx": [round(float(c), 2) for c in centroid], "size": size_bin(diameter)})
    out.sort(key=lambda t: -t["volume_ml"])
    located = locate_tumors(out, affine_lps)
    return [{"id": k, **{key: v for key, v in t.items() if key != "centroid_lps_mm"},
             "center_mm": [round(float(c), 2) for c in t["centroid_lps_mm"]]} for k, t in enumerate(located, start=1)]


def in_mask(mask: np.ndarray | None, voxel_zyx: Sequence[float]) -> bool:
    """Whether the voxel nearest a (z, y, x) position is set in ``mask`` (False without a mask)."""
    if mask is None:
        return False
    idx = tuple(min(max(round(float(v)), 0), n - 1) for v, n in zip(voxel_zyx, mask.shape, strict=True))
    return bool(mask[idx])


def judge_reported(truth: list[dict[str, Any]] | None, reported: list[dict[str, Any]],
                   in_ignored: Sequence[bool]) -> tuple[list[dict[str, Any]], list[str]]:
    """True tumors with ``found`` / ``matched_id`` / ``distance_mm``, and a verdict per reported tumor (located:
    ``centroid_lps_mm``): "true" (reaches a true tumor), "false", "ignored" (no true tumor, centroid in an ignored
    voxel) or "unverified" (``truth`` None: tumors not annotated)."""
    if truth is None:
        return [], ["unverified"] * len(reported)
    matches = match_tumors(truth, reported)
    reach = within_reach(truth, reported)
    judged = [{**t, "found": m["matched_id"] is not None, "matched_id": m["matched_id"], "distance_mm": m["distance_mm"]}
              for t, m in zip(truth, matches, strict=True)]
    verdicts = ["true" if reach[:, j].any() else "ignored" if in_ignored[j] else "false" for j in range(len(reported))]
    return judged, verdicts


def passed_checks(candidate: dict[str, Any]) -> bool:
    """A candidate that passed the shape and contrast checks: reported, or rejected by the confidence threshold
    alone (``medseg.ops.lesions`` checks confidence last)."""
    return bool(candidate.get("reported")) or candidate.get("rejected_by") == "confidence"


def found_by_size(truth: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    return {key: {"found": sum(1 for t in truth if t["size"] == key and t["found"]),
                  "total": sum(1 for t in truth if t["size"] == key)} for key, *_ in SIZE_BINS}


def measure_case(labels: np.ndarray, findings: dict[str, Any], truth: Truth, spacing: Sequence[float],
                 affine_lps: np.ndarray) -> dict[str, Any]:
    """The figures of one case: served ``labels`` (z, y, x) and ``findings`` against ``truth`` on the same grid;
    ``affine_lps`` maps (x, y, z) voxel indices to LPS mm."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    keep = None if truth.ignore is None else ~truth.ignore
    served = labels > 0 if keep is None else (labels > 0) & keep
    annotated_liver = bool(truth.organ.any())
    status = findings.get("status", {})
    liver = {"annotated": annotated_liver, "dice": round(dice(labels > 0, truth.organ, truth.ignore), 4),
             "true_negative": not annotated_liver and not served.any(),
             "false_liver": not annotated_liver and bool(served.any()),
             "truth_ml": round(float(np.count_nonzero(truth.organ)) * voxel_ml, 2),
             "reported_ml": findings.get("liver", {}).get("volume_ml")}
    reported = locate_tumors(findings.get("tumors", []), affine_lps)
    in_ignored = [in_mask(truth.ignore, t["centroid_voxel_zyx"]) for t in reported]
    truth_tumors = None if truth.tumor is None else true_tumors(truth.tumor, spacing, affine_lps)
    judged, verdicts = judge_reported(truth_tumors, reported, in_ignored)
    reported_doc = [{"id": t["id"], "volume_ml": t["volume_ml"], "longest_axial_diameter_mm": t["longest_axial_diameter_mm"],
                     "confidence": t.get("confidence"), "centroid_voxel_zyx": t["centroid_voxel_zyx"], "verdict": v}
                    for t, v in zip(reported, verdicts, strict=True)]
    tumors: dict[str, Any] = {"annotated": truth.tumor is not None,
                              "reported_burden_ml": findings.get("tumor_burden_ml"), "reported": reported_doc,
                              "false": verdicts.count("false"), "unverified": verdicts.count("unverified"),
                              "ignored": verdicts.count("ignored")}
    eligible = locate_tumors([c for c in findings.get("tumor_candidates", []) if passed_checks(c)], affine_lps)
    if truth.tumor is None or truth_tumors is None:
        tumors.update(dice=None, truth_burden_ml=None, voxels=None, truth=None, found=None, froc=None)
    else:
        pred = labels == TUMOR
        t_mask, p_mask = (truth.tumor, pred) if keep is None else (truth.tumor & keep, pred & keep)
        reach = within_reach(truth_tumors, eligible)
        tumors.update(
            dice=round(dice(pred, truth.tumor, truth.ignore), 4),
            truth_burden_ml=round(float(np.count_nonzero(t_mask)) * voxel_ml, 3),
            voxels={"truth": int(np.count_nonzero(t_mask)), "reported": int(np.count_nonzero(p_mask)),
                    "both": int(np.count_nonzero(t_mask & p_mask))},
            truth=judged, found=found_by_size(judged),
            froc={"truth_mm": [t["diameter_mm"] for t in truth_tumors],
                  "candidates": [{"confidence": c["confidence"], "reported": bool(c.get("reported")),
                                  "matches": [int(i) for i in np.flatnonzero(reach[:, j])],
                                  "false": not reach[:, j].any() and not in_mask(truth.ignore, c["centroid_voxel_zyx"])}
                                 for j, c in enumerate(eligible)]})
    return {"status": {"code": status.get("code"), "reported": status.get("reported"), "reason": status.get("reason")},
            "liver": liver, "tumors": tumors,
            "candidates": {"all": len(findings.get("tumor_candidates", [])), "passed_checks": len(eligible)}}


# ------------------------------------------------------------------------------------ the figures of a run


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "min": None, "mean": None, "median": None}
    return {"n": len(values), "min": round(min(values), 4), "mean": round(statistics.fmean(values), 4),
            "median": round(statistics.median(values), 4)}


def _ratio(found: int, total: int) -> dict[str, Any]:
    return {"found": found, "total": total, "sensitivity": round(found / total, 4) if total else None}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The overall figures of per-case records (``measure_case`` plus ``case``, or ``error``)."""
    ok = [r for r in records if not r.get("error")]
    annotated = [r for r in ok if r["tumors"]["annotated"]]
    tumors = {key: _ratio(sum(r["tumors"]["found"][key]["found"] for r in annotated),
                          sum(r["tumors"]["found"][key]["total"] for r in annotated)) for key, *_ in SIZE_BINS}
    tumors["all"] = _ratio(sum(v["found"] for v in tumors.values()), sum(v["total"] for v in tumors.values()))
    voxels = [r["tumors"]["voxels"] for r in annotated]
    pooled = sum(v["truth"] + v["reported"] for v in voxels)
    false = sum(r["tumors"]["false"] for r in annotated)
    times = [r["timings_s"]["total_s"] for r in ok if "timings_s" in r]
    return {
        "cases": len(records), "evaluated": len(ok), "errors": len(records) - len(ok),
        "statuses": dict(sorted(Counter(r["status"]["code"] for r in ok).items())),
        "liver_dice": _stats([r["liver"]["dice"] for r in ok if r["liver"]["annotated"]]),
        "liver_true_negatives": sum(r["liver"]["true_negative"] for r in ok),
        "liver_false_positives": sum(r["liver"]["false_liver"] for r in ok),
        "tumor_annotated_cases": len(annotated),
        "tumor_dice": _stats([r["tumors"]["dice"] for r in annotated if r["tumors"]["truth"]]),
        "tumor_dice_pooled": round(2 * sum(v["both"] for v in voxels) / pooled, 4) if pooled else None,
        "tumors": tumors,
        "false_tumors": false,
        "false_tumors_per_scan": round(false / len(annotated), 3) if annotated else None,
        "unverified_tumors": sum(r["tumors"]["unverified"] for r in ok),
        "time_s": {"total_per_case_median": round(statistics.median(times), 3) if times else None},
    }


def froc_of(records: list[dict[str, Any]], threshold: float | None) -> dict[str, Any]:
    """The FROC curve over the tumor-annotated cases' candidates that passed the shape and contrast checks, and the
    served operating point (what the server reported, at ``threshold``)."""
    cases = [r["tumors"]["froc"] for r in records if not r.get("error") and r["tumors"]["annotated"]]

    def rounded(p: dict[str, Any]) -> dict[str, Any]:
        return {**p, "sensitivity": {k: None if v is None else round(v, 4) for k, v in p["sensitivity"].items()},
                "false_per_scan": None if p["false_per_scan"] is None else round(p["false_per_scan"], 4)}

    return {"scans": len(cases), "candidates": sum(len(c["candidates"]) for c in cases),
            "sizes_mm": {k: [lo, None if hi == float("inf") else hi] for k, (lo, hi) in FROC_SIZES.items()},
            "points": [rounded(p) for p in froc(cases)] if cases else [],
            "operating_point": {"threshold": threshold, **rounded(froc_point(cases, lambda c: bool(c["reported"])))}
            if cases else None}


def _liver_key(r: dict[str, Any]) -> tuple[float, str]:
    return (float(r["liver"]["dice"]), str(r["case"]))


def _false_key(r: dict[str, Any]) -> tuple[float, str]:
    return (-float(r["tumors"]["false"]), str(r["case"]))


WORST: dict[str, tuple[Callable[[dict[str, Any]], bool], Callable[[dict[str, Any]], tuple[float, str]]]] = {
    "lowest_liver_dice": (lambda r: not r.get("error") and r["liver"]["annotated"], _liver_key),
    "most_false_tumors": (lambda r: not r.get("error") and r["tumors"]["false"] > 0, _false_key),
}


def worst_cases(records: Iterable[dict[str, Any]], n: int = WORST_N) -> dict[str, list[str]]:
    """Per criterion, the names of the ``n`` worst cases: lowest liver Dice (annotated livers), most false tumors
    (at least one); ties by name."""
    rs = list(records)
    return {name: [r["case"] for r in sorted(filter(eligible, rs), key=key)[:n]] for name, (eligible, key) in WORST.items()}


# --------------------------------------------------------------------------------- pictures and the report


def render_case_preview(ct: np.ndarray, labels: np.ndarray, spacing: Sequence[float], findings: dict[str, Any],
                        truth: Truth, truth_tumors: list[dict[str, Any]] | None, heading: str) -> Image.Image:
    """``medseg_client.io.preview``'s montage of the served labels, and under it the same of the annotation."""
    from PIL import Image, ImageDraw

    from medseg_client.io.preview import render_preview

    truth_findings = {"liver": {"volume_ml": float(np.count_nonzero(truth.organ)) * float(np.prod(spacing)) / 1000.0},
                      "tumors": [{"id": t["id"], "centroid_voxel_zyx": t["centroid_voxel_zyx"]} for t in truth_tumors or []]}
    parts = [(f"{heading} - served", render_preview(ct, labels, spacing, findings)),
             ("annotation" + ("" if truth.tumor is not None else " (tumors not annotated)"),
              render_preview(ct, truth.as_labels(), spacing, truth_findings))]
    bar = 20
    out = Image.new("RGB", (max(p.width for _, p in parts), sum(p.height + bar for _, p in parts)), (0, 0, 0))
    draw = ImageDraw.Draw(out)
    y = 0
    for title, picture in parts:
        draw.text((4, y + 4), title, fill=(255, 255, 255))
        out.paste(picture, (0, y + bar))
        y += picture.height + bar
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _sens(ratio: dict[str, Any]) -> str:
    s = ratio["sensitivity"]
    return f"{ratio['found']}/{ratio['total']}" + ("" if s is None else f" ({s:.3f})")


def report_markdown(doc: dict[str, Any]) -> str:
    """report.md: what was judged on what, the overall figures each with its data and machine, a row per case."""
    s, data, server, m = doc["summary"], doc["data"], doc["server"], doc["machine"]
    model = server.get("model") or {}
    model_line = (f"`{model.get('ensemble', server['model_name'])}` version {model.get('version', '?')}, weights sha256 "
                  f"`{str(model.get('weights_sha256', '?'))[:16]}`" if model else f"`{server['model_name']}` (no result)")
    data_cell = f"`{data['folder']}`, {s['evaluated']} of {s['cases']} cases"
    machine_cell = f"client {m['processor']}, {m['cpu_count']} cores; server {server['url']}"
    lines = [f"# medseg evaluate: {data['folder']}", "",
             f"Model {model_line}, served at `{server['url']}`; data `{data['folder']}` ({data['layout']}, "
             f"label map {_label_map_text(data['label_map'])}, ignore label {_fmt(data['ignore_label'])}); {s['cases']} cases, "
             f"{s['errors']} errors; run {doc['date']} from a client on {m['processor']} ({m['cpu_count']} cores, "
             f"{m['system']}).", "", "## Overall", "",
             "| figure | value | data | machine |", "|---|---|---|---|"]
    ld = s["liver_dice"]

    def row(figure: str, value: str, data: str = data_cell) -> None:
        lines.append(f"| {figure} | {value} | {data} | {machine_cell} |")

    row("liver Dice min / mean / median", f"{_fmt(ld['min'])} / {_fmt(ld['mean'])} / {_fmt(ld['median'])}",
        f"{data_cell}: the {ld['n']} with an annotated liver")
    row("no liver annotated: true negatives / false livers", f"{s['liver_true_negatives']} / {s['liver_false_positives']}")
    tdata = f"{data_cell}: the {s['tumor_annotated_cases']} with tumors annotated"
    for key, display, *_ in SIZE_BINS:
        row(f"true tumors {display} found", _sens(s["tumors"][key]), tdata)
    row("true tumors found, all sizes", _sens(s["tumors"]["all"]), tdata)
    row("false tumors (per scan)", f"{s['false_tumors']} ({_fmt(s['false_tumors_per_scan'])})", tdata)
    td = s["tumor_dice"]
    row("tumor Dice min / mean / median (cases with tumors); pooled",
        f"{_fmt(td['min'])} / {_fmt(td['mean'])} / {_fmt(td['median'])}; {_fmt(s['tumor_dice_pooled'])}", tdata)
    row("unverified tumors (tumors not annotated)", str(s["unverified_tumors"]))
    row("statuses", ", ".join(f"{k} {v}" for k, v in s["statuses"].items()) or "-")
    row("errors (not read or refused)", str(s["errors"]), f"`{data['folder']}`, {s['cases']} cases")
    row("time per case, median (read + served + measured)", f"{_fmt(s['time_s']['total_per_case_median'], 2)} s")
    lines += ["", "## Per case", "",
              "| case | status | liver Dice | tumor Dice | found >= 10 / 5-10 / < 5 mm | false | unverified | "
              "tumor burden truth / reported (mL) | time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["cases"]:
        if r.get("error"):
            lines.append(f"| {_cell(r['case'])} | error ({r['stage']}): {_cell(r['error'])} | | | | | | | |")
            continue
        t = r["tumors"]
        found = " / ".join(f"{t['found'][k]['found']}/{t['found'][k]['total']}" for k, *_ in SIZE_BINS) if t["found"] else "-"
        lines.append(f"| {_cell(r['case'])} | {r['status']['code']} | {_fmt(r['liver']['dice'])}"
                     f"{' (true negative)' if r['liver']['true_negative'] else ''} | {_fmt(t['dice'])} | {found} | "
                     f"{t['false'] if t['annotated'] else '-'} | {t['unverified']} | {_fmt(t['truth_burden_ml'], 2)} / "
                     f"{_fmt(t['reported_burden_ml'], 2)} | {_fmt(r['timings_s']['total_s'], 2)} |")
    f = doc["froc"]
    lines += ["", "## FROC", "", f"![FROC]({FROC_FILE})", ""]
    if f["operating_point"]:
        op = f["operating_point"]
        lines.append(f"{f['candidates']} candidates that passed the shape and contrast checks in {f['scans']} scans "
                     f"with tumors annotated ({data_cell}; {machine_cell}). Served operating point (confidence >= "
                     f"{_fmt(op['threshold'], 2)}): sensitivity >= 10 mm {_fmt(op['sensitivity'][BIG])}, all "
                     f"{_fmt(op['sensitivity']['all'])}, {_fmt(op['false_per_scan'])} false tumors per scan.")
    else:
        lines.append("No case has tumors annotated: no FROC curve.")
    lines += ["", "## Per-case liver Dice", "", f"![liver Dice]({DICE_FILE})", "", "## Worst cases", ""]
    for name, entries in doc["worst"].items():
        lines.append(f"**{name.replace('_', ' ')}**: " + (", ".join(e["case"] for e in entries) or "none"))
        lines.append("")
        lines += [f"![{e['case']}]({e['picture']})" for e in entries if e.get("picture")]
        lines.append("")
    lines += ["## How the figures are computed", "", DEFINITIONS]
    return "\n".join(lines)


def _label_map_text(described: Any) -> str:
    if isinstance(described, dict):
        return " ".join(f"{k}={','.join(map(str, v))}" for k, v in described.items() if v is not None)
    return str(described)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_froc(doc: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    f = doc["froc"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if f["points"]:
        for key, label, color in ((BIG, "true tumors >= 10 mm", "tab:blue"), ("all", "all true tumors", "tab:orange")):
            pts = [(p["false_per_scan"], p["sensitivity"][key]) for p in f["points"] if p["sensitivity"][key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", color=color, label=label)
            op = f["operating_point"]
            if op["sensitivity"][key] is not None:
                ax.scatter([op["false_per_scan"]], [op["sensitivity"][key]], marker="*", s=160, color=color,
                           edgecolor="black", zorder=3, label=f"served (confidence >= {_fmt(op['threshold'], 2)})")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no tumors annotated: no FROC", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("false tumors per scan")
    ax.set_ylabel("sensitivity")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{doc['data']['folder']}: {f['scans']} scans, {f['candidates']} candidates\n"
                 f"{_model_name(doc)}; client {doc['machine']['processor']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_dice(doc: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    cases = doc["cases"]
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 3 + 0.35 * len(cases))), 4.5))
    for i, r in enumerate(cases):
        if r.get("error"):
            ax.scatter([i], [0], marker="x", color="tab:red")
        else:
            color = "tab:green" if r["status"]["code"] == "ok" else "tab:gray"
            ax.bar(i, r["liver"]["dice"], color=color, hatch="//" if r["liver"]["true_negative"] else None)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([r["case"] for r in cases] if len(cases) <= 60 else [""] * len(cases), rotation=90, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("liver Dice")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{doc['data']['folder']}: liver Dice per case, {_model_name(doc)}; client {doc['machine']['processor']}\n"
                 "green: status ok, gray: nothing reported, hatched: true negative, x: error", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _model_name(doc: dict[str, Any]) -> str:
    model = doc["server"].get("model") or {}
    return f"{model.get('ensemble', doc['server']['model_name'])} v{model.get('version', '?')}"


def summary_lines(doc: dict[str, Any]) -> str:
    """A few human lines of a run, for the terminal."""
    s = doc["summary"]
    ld = s["liver_dice"]
    lines = [f"{s['evaluated']} of {s['cases']} cases evaluated ({s['errors']} errors); statuses: "
             + (", ".join(f"{k} {v}" for k, v in s["statuses"].items()) or "-"),
             f"liver Dice min {_fmt(ld['min'])} mean {_fmt(ld['mean'])} median {_fmt(ld['median'])} over {ld['n']} "
             f"annotated livers; {s['liver_true_negatives']} true negatives, {s['liver_false_positives']} false livers"]
    if s["tumor_annotated_cases"]:
        lines.append(f"tumors >= 10 mm found {_sens(s['tumors'][BIG])}, 5-10 mm {_sens(s['tumors']['5_to_10mm'])}, "
                     f"< 5 mm {_sens(s['tumors']['lt_5mm'])}; {s['false_tumors']} false tumors "
                     f"({_fmt(s['false_tumors_per_scan'])} per scan)")
    if s["unverified_tumors"]:
        lines.append(f"{s['unverified_tumors']} reported tumors unverified (tumors not annotated)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ reading the data


@dataclass(frozen=True)
class Case:
    """One annotated study: a NIfTI CT with a label volume, or a DICOM series folder with a SEG."""

    name: str
    image: Path  # NIfTI file, or the folder holding the DICOM series
    labels: Path | None  # label NIfTI or SEG file; None: missing (an error of this case)
    kind: str  # "nifti" or "dicom"


def _nifti_case_name(path: Path) -> str | None:
    for suffix in ("_0000.nii.gz", "_0000.nii"):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _is_dicom_file(path: Path) -> bool:
    from medseg_client.io.studies import claims_dicom

    return path.suffix.lower() == ".dcm" or claims_dicom(path)


def _seg_files(folder: Path) -> list[Path]:
    """The DICOM SEG files under ``folder`` (headers read only as far as SOPClassUID and Modality)."""
    import pydicom

    segs = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
        except Exception:  # not DICOM: other files may sit beside a series
            continue
        if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES or str(ds.get("Modality", "")) == "SEG":
            segs.append(p)
    return segs


def find_cases(data: Path) -> tuple[str, list[Case]]:
    """The layout of DATA ("nnunet" or "dicom") and its cases, by name."""
    if not data.is_dir():
        raise DataError(f"{data}: no such folder" if not data.exists() else f"{data}: not a folder")
    for images_dir, labels_dir in (("imagesTs", "labelsTs"), ("imagesTr", "labelsTr")):
        images = data / images_dir
        if images.is_dir():
            labels = data / labels_dir
            if not labels.is_dir():
                raise DataError(f"{data}: {images_dir}/ has no {labels_dir}/ beside it (the annotations)")
            cases = []
            for p in sorted(images.iterdir()):
                name = _nifti_case_name(p)
                if name is None:
                    continue
                label = next((q for q in (labels / f"{name}.nii.gz", labels / f"{name}.nii") if q.is_file()), None)
                cases.append(Case(name, p, label, "nifti"))
            if not cases:
                raise DataError(f"{images}: no <case>_0000.nii.gz images")
            return "nnunet", cases
    direct = [p for p in data.iterdir() if p.is_file() and not p.name.startswith(".")]
    folders = [data] if any(_is_dicom_file(p) for p in direct) else sorted(
        p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    cases = []
    for folder in folders:
        segs = _seg_files(folder)
        if not segs:
            cases.append(Case(folder.name, folder, None, "dicom"))
        for seg in segs:
            name = folder.name if len(segs) == 1 else f"{folder.name}_{seg.stem}"
            cases.append(Case(name, folder, seg, "dicom"))
    if not cases:
        raise DataError(f"{data}: no cases: expected imagesTs/<case>_0000.nii.gz with labelsTs/<case>.nii.gz, or "
                        "DICOM series folders each with a SEG")
    return "dicom", cases


def native_shape(study: Study) -> tuple[int, ...]:
    """The study's shape in its source's (i, j, k) voxel order."""
    canon_xyz = study.ct.shape[::-1]
    return tuple(int(canon_xyz[int(axis)]) for axis, _ in study.ornt)


def to_canonical(native: np.ndarray, study: Study) -> np.ndarray:
    """A native (i, j, k) volume onto the study's canonical (z, y, x) grid, exactly as its CT was."""
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(native, study.ornt).transpose(2, 1, 0))


def check_label_grid(case: str, shape: Sequence[int], affine: np.ndarray, image_shape: Sequence[int],
                     image_affine: np.ndarray, atol_mm: float = 0.01) -> None:
    """Refuse labels whose voxel grid is not the image's: the same shape and, within ``atol_mm``, the same affine."""
    if tuple(int(n) for n in shape) != tuple(int(n) for n in image_shape):
        raise DataError(f"{case}: labels of shape {tuple(int(n) for n in shape)} do not match the image's "
                        f"{tuple(int(n) for n in image_shape)}")
    if not np.allclose(np.asarray(affine, float), np.asarray(image_affine, float), atol=atol_mm, rtol=0):
        diff = float(np.abs(np.asarray(affine, float) - np.asarray(image_affine, float)).max())
        raise DataError(f"{case}: the labels' affine differs from the image's by up to {diff:.3g} mm (voxel grids "
                        "must be the same; resample the labels onto the image)")


def read_nifti_truth(case: Case, study: Study, label_map: LabelMap, ignore_label: int | None) -> Truth:
    from medseg_client.io.studies import load_nifti_volume

    assert case.labels is not None
    try:
        values, img = load_nifti_volume(case.labels, "label volume")
    except StudyError as e:
        raise DataError(f"{case.name}: {e}") from e
    if np.issubdtype(values.dtype, np.floating):
        if not np.array_equal(values, np.rint(values)):
            raise DataError(f"{case.name}: {case.labels.name} holds non-integer values: not a label volume")
    check_label_grid(case.name, values.shape, img.affine, native_shape(study), study.native_affine_ras)
    native = truth_from_values(values, label_map, ignore_label)
    return Truth(to_canonical(native.organ, study), None if native.tumor is None else to_canonical(native.tumor, study),
                 None if native.ignore is None else to_canonical(native.ignore, study))


LIVER_CODES = {"10200004"}  # SNOMED CT Liver
# SNOMED CT: Neoplasm; Malignant neoplasm, primary; Neoplasm, metastatic; Mass; Lesion; Neoplasm of liver;
# Malignant neoplasm of liver; Secondary malignant neoplasm of liver
TUMOR_CODES = {"108369006", "86049000", "14799000", "4147007", "52988006", "126851005", "93870000", "94381002"}
_TUMOR_WORDS = re.compile(r"tumou?r|neoplasm|lesion|cancer|carcinoma|metasta|mass\b|hcc", re.IGNORECASE)
_NOT_LIVER_WORDS = re.compile(r"vessel|vein|arter|portal|duct|bile", re.IGNORECASE)


def segment_role(label: str, type_code: str, type_meaning: str) -> str | None:
    """"liver", "tumor" or None (another structure) from a SEG segment's label and segmented property type."""
    text = f"{label} {type_meaning}"
    if type_code in TUMOR_CODES or _TUMOR_WORDS.search(text):
        return "tumor"
    if (type_code in LIVER_CODES or re.search(r"liver|hepat", text, re.IGNORECASE)) and not _NOT_LIVER_WORDS.search(text):
        return "liver"
    return None


def seg_label_map(case: str, segments: Sequence[tuple[int, str, str, str]], label_map: LabelMap | None) -> LabelMap:
    """Segment numbers of liver and tumor: from ``label_map`` (segment numbers), else from each segment's
    (number, label, property type code, meaning). Refuses a SEG without a liver."""
    numbers = {n for n, *_ in segments}
    described = ", ".join(f"{n} {label!r}" for n, label, *_ in segments)
    if label_map is not None:
        missing = sorted(label_map.organ - numbers)
        if missing:
            raise DataError(f"{case}: the SEG has no segment {missing} of --label-map (its segments: {described})")
        return label_map
    liver = frozenset(n for n, label, code, meaning in segments if segment_role(label, code, meaning) == "liver")
    tumor = frozenset(n for n, label, code, meaning in segments if segment_role(label, code, meaning) == "tumor")
    if not liver:
        raise DataError(f"{case}: the SEG has no Liver segment (its segments: {described}); name them with "
                        "--label-map liver=N[,M] tumor=K (segment numbers)")
    return LabelMap(liver, tumor or None)


def read_seg_truth(case: Case, study: Study, label_map: LabelMap | None) -> tuple[Truth, LabelMap]:
    """The SEG's liver and tumor segments on the study's canonical grid, and the segment numbers used."""
    import highdicom as hd

    assert case.labels is not None
    try:
        seg = hd.seg.segread(case.labels)
        segments = [(int(s.SegmentNumber), str(s.get("SegmentLabel", "")),
                     str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue) if "SegmentedPropertyTypeCodeSequence" in s else "",
                     str(s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning) if "SegmentedPropertyTypeCodeSequence" in s else "")
                    for s in seg.SegmentSequence]
    except Exception as e:
        raise DataError(f"{case.name}: {case.labels.name} is not a readable DICOM SEG ({type(e).__name__})") from e
    used = seg_label_map(case.name, segments, label_map)
    numbers = sorted(used.organ)
    headers = study.dicom_headers
    try:
        if len({id(h) for h in headers}) == 1 and len(headers) > 1:  # one multi-frame source
            pixels = seg.get_pixels_by_source_frame(
                str(headers[0].SOPInstanceUID), [i + 1 for i in study.frame_indices], segment_numbers=numbers,
                assert_missing_frames_are_empty=True, skip_overlap_checks=True)
        else:
            pixels = seg.get_pixels_by_source_instance(
                [str(h.SOPInstanceUID) for h in headers], segment_numbers=numbers,
                assert_missing_frames_are_empty=True, skip_overlap_checks=True)
    except Exception as e:  # highdicom raises ValueError/KeyError/RuntimeError for SEGs of other frames; its
        # message quotes UIDs from the headers, so only its type is said
        raise DataError(f"{case.name}: the SEG's frames do not map onto the CT series' slices "
                        f"({type(e).__name__})") from e
    fractional = np.issubdtype(pixels.dtype, np.floating)

    def mask_of(values: frozenset[int]) -> np.ndarray:
        idx = [numbers.index(n) for n in sorted(values)]
        m = (pixels[..., idx] >= 0.5 if fractional else pixels[..., idx] > 0).any(axis=-1)  # (k, rows, cols)
        if study.slice_shifts is not None:  # the CT's slices were shifted onto an untilted grid: so are these
            m = np.stack([ndimage.shift(m[k].astype(np.uint8), tuple(shift), order=0) > 0
                          for k, shift in enumerate(study.slice_shifts)])
        return to_canonical(m.transpose(2, 1, 0), study)

    return Truth(mask_of(used.organ), None if used.tumor is None else mask_of(used.tumor)), used


def read_case(case: Case, label_map: LabelMap | None, ignore_label: int | None) -> tuple[Study, Truth, dict[str, Any]]:
    """The study, its annotation on the study's grid, and what was read (for the record)."""
    from medseg_client.io.studies import read_study

    if case.labels is None:
        raise DataError(f"{case.name}: no annotation " + ("(labels file missing)" if case.kind == "nifti"
                                                           else "(no DICOM SEG in the folder)"))
    if case.kind == "nifti":
        study = read_study(case.image)
        truth = read_nifti_truth(case, study, label_map or DEFAULT_LABEL_MAP, ignore_label)
        return study, truth, {"format": "nifti", "image": case.image.name, "labels": case.labels.name}
    import pydicom

    referenced = pydicom.dcmread(case.labels, stop_before_pixels=True).get("ReferencedSeriesSequence") or []
    series = str(referenced[0].SeriesInstanceUID) if referenced and "SeriesInstanceUID" in referenced[0] else None
    study = read_study(case.image, series)
    truth, used = read_seg_truth(case, study, label_map)
    return study, truth, {"format": "dicom", "series_instance_uid": study.series_uid, "seg": case.labels.name,
                          "segments": used.describe()}


# ----------------------------------------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    """The client machine the run was measured from (the server may be elsewhere: its URL is in the report)."""
    from medseg.model.provenance import cpu_model

    return {"processor": cpu_model() or platform.processor() or platform.machine(), "architecture": platform.machine(),
            "cpu_count": os.cpu_count(), "system": platform.platform(terse=True), "python": platform.python_version(),
            "role": "client"}


def _one_line(e: BaseException) -> str:
    return one_line(str(e) or type(e).__name__)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "case"


class _WorstPictures:
    """The pictures of the worst cases so far, per criterion (PNG bytes of at most ``n`` cases each)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.kept: dict[str, list[tuple[tuple[float, str], str, bytes]]] = {k: [] for k in WORST}

    def wants(self, record: dict[str, Any]) -> bool:
        for name, (eligible, key) in WORST.items():
            kept = self.kept[name]
            if eligible(record) and (len(kept) < self.n or key(record) < kept[-1][0]):
                return True
        return False

    def offer(self, record: dict[str, Any], png: bytes) -> None:
        for name, (eligible, key) in WORST.items():
            if eligible(record):
                kept = self.kept[name]
                kept.append((key(record), record["case"], png))
                kept.sort(key=lambda k: k[0])
                del kept[self.n :]

    def pictures(self) -> dict[str, bytes]:
        return {case: png for kept in self.kept.values() for _, case, png in kept}


def evaluate_case(session: SegmentationClient, case: Case, label_map: LabelMap | None, ignore_label: int | None,
                  pictures: _WorstPictures) -> dict[str, Any]:
    """One case's record; a case that cannot be read or is refused by the server is an error record."""
    t0 = time.perf_counter()
    try:
        study, truth, source = read_case(case, label_map, ignore_label)
    except (MedsegError, OSError, ValueError) as e:  # ValueError: what the NIfTI and DICOM libraries raise on bad data
        return {"case": case.name, "error": _one_line(e), "stage": "read"}
    t_read = time.perf_counter() - t0
    try:
        result = session.segment(study.ct, study.spacing)
    except MedsegError as e:  # refused (INVALID_ARGUMENT), failed on the server, or unreachable after retries
        return {"case": case.name, "error": _one_line(e), "stage": "segment"}
    t1 = time.perf_counter()
    record = {"case": case.name, "source": source, "shape_zyx": list(study.ct.shape),
              "spacing_zyx_mm": [round(float(s), 4) for s in study.spacing],
              **measure_case(result.labels, result.findings, truth, study.spacing, study.affine_lps)}
    record["attempts"] = result.attempts
    record["timings_s"] = {"read_s": round(t_read, 3), **result.timings_s,
                           "measure_s": round(time.perf_counter() - t1, 3)}
    record["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
    record["_model"] = result.findings.get("model")
    record["_threshold"] = result.findings.get("tumor_operating_point", {}).get("confidence_threshold")
    if pictures.wants(record):
        heading = (f"{case.name}: liver Dice {record['liver']['dice']:.3f}, status {record['status']['code']}, "
                   f"{record['tumors']['false']} false tumor(s)")
        picture = render_case_preview(study.ct, result.labels, study.spacing, result.findings, truth,
                                      record["tumors"]["truth"], heading)
        buffer = BytesIO()
        picture.save(buffer, format="PNG")
        pictures.offer(record, buffer.getvalue())
    return record


def _move_into(staging: Path, out: Path) -> None:
    """A new ``out`` is ``staging`` renamed; into an existing one each output replaces its namesake."""
    if not out.is_dir():
        staging.rename(out)
        return
    for f in staging.iterdir():
        target = out / f.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        f.replace(target)


def evaluate_to_dir(url: str, data: Path, out: Path, *, label_map: LabelMap | None = None,
                    ignore_label: int | None = None, limit: int | None = None, model_name: str = SPEC.ensemble.name,
                    timeout_s: float = 300.0, **client: Any) -> dict[str, Any]:
    """Segment every case of ``data`` through the server at ``url``, compare with its annotation and write
    metrics.json, report.md, froc.png, dice.png and worst/<case>.png into ``out``, staged and moved in when all are
    written. ``label_map`` None: this project's values (NIfTI) or the SEG's segment descriptions (DICOM). ``client``
    are SegmentationClient's transport options. Returns the metrics document."""
    from tqdm import tqdm

    from medseg_client.client import SegmentationClient
    from medseg_client.segment import check_out_dir

    started = datetime.now(timezone.utc)
    check_out_dir(out)
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    layout, cases = find_cases(data)
    if layout == "dicom" and ignore_label is not None:
        raise DataError("--ignore-label applies to label volumes (the nnU-Net layout); a DICOM SEG has no ignore value")
    check_ignore_label(label_map or DEFAULT_LABEL_MAP, ignore_label)
    cases = cases[:limit] if limit is not None else cases
    records: list[dict[str, Any]] = []
    pictures = _WorstPictures(WORST_N)
    with SegmentationClient(url, model_name=model_name, timeout_s=timeout_s, **client) as session:
        session.check_model()  # an unreachable server or another model: one line and exit 2, before any case
        progress = tqdm(cases, desc="medseg evaluate", unit="case", file=sys.stderr)
        for case in progress:
            record = evaluate_case(session, case, label_map, ignore_label, pictures)
            if record.get("error"):
                progress.write(f"medseg evaluate: {case.name}: {record['stage']} error: {record['error']}", file=sys.stderr)
            records.append(record)
    label_map_doc: Any = (label_map.describe() if label_map else
                          DEFAULT_LABEL_MAP.describe() if layout == "nnunet" else "from segment descriptions")
    png = pictures.pictures()
    doc = build_document(records, started=started, data={
        "folder": data.resolve().name, "layout": layout, "cases": len(cases), "limit": limit,
        "label_map": label_map_doc, "ignore_label": ignore_label}, url=url, model_name=model_name, pictures=set(png))
    write_outputs(doc, png, out)
    return doc


def build_document(records: list[dict[str, Any]], *, started: datetime, data: dict[str, Any], url: str, model_name: str,
                   pictures: set[str]) -> dict[str, Any]:
    """metrics.json of a run's records (each case's served model and threshold are taken out of them); ``pictures``:
    the cases whose worst/ picture there is."""
    models = [r.pop("_model") for r in records if "_model" in r]
    thresholds = [r.pop("_threshold") for r in records if "_threshold" in r]
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "date": started.isoformat(timespec="seconds"),
        "data": data,
        "server": {"url": url, "model_name": model_name, "model": models[0] if models else None,
                   "model_changed_during_run": any(m != models[0] for m in models)},
        "machine": machine(),
        "summary": summarize(records),
        "froc": froc_of(records, thresholds[0] if thresholds else None),
        "worst": {name: [{"case": c, "picture": f"{WORST_DIR}/{_safe_name(c)}.png" if c in pictures else None}
                         for c in names] for name, names in worst_cases(records).items()},
        "cases": records,
    }
    doc["summary"]["time_s"]["run"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    return doc


def write_outputs(doc: dict[str, Any], pictures: dict[str, bytes], out: Path) -> None:
    """metrics.json, report.md, froc.png, dice.png and worst/ into ``out``: staged beside it and moved in when all
    are written (a new ``out`` is the staging folder renamed); whatever fails, the staging folder is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".medseg-{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        (staging / WORST_DIR).mkdir()
        for entries in doc["worst"].values():
            for e in entries:
                if e["picture"]:
                    (staging / e["picture"]).write_bytes(pictures[e["case"]])
        plot_froc(doc, staging / FROC_FILE)
        plot_dice(doc, staging / DICE_FILE)
        (staging / REPORT_FILE).write_text(report_markdown(doc) + "\n")
        (staging / METRICS_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        _move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
