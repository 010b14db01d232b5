"""Postprocessing math: the segmenter's labels -> clean labels on the study's own grid -> findings, and nothing that
cannot be right.

On the model grid: the segmenter's labels (its head fused the argmax) and probabilities; then the study is judged
(``judge``): is it a CT, which body regions does it show, is there a plausible liver in view
(``medseg.ops.anatomy``)? Only then the largest liver component (liver and tumor voxels together, the cavities it
encloses filled) is kept and each tumor candidate is judged (``medseg.ops.lesions``: confidence, strips along the
surface, contrast). Labels go back to the input grid (nearest, same centred-grid convention as the preprocessing),
where the findings are measured at the study's resolution. The findings open with a study-level ``status``: what
was reported and, where nothing was, why; the labels hold nothing it denies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.ops.anatomy import not_a_ct, scan_regions
from medseg.ops.lesions import Candidate, apply_verdicts, judge_candidates
from medseg.ops.preprocess import source_coordinate, source_coordinates, target_indices
from medseg_client.spec import LIVER, PROBABILITY_CHANNELS, SPEC, TUMOR, Label

_FULL = np.ones((3, 3, 3), bool)  # 26-connectivity


def head(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The segmenter's head (``medseg.model.head``) in numpy, for logits of any leading batch shape (..., C, Z, Y, X):
    uint8 argmax labels (ties to the lower class) and float16 (tumor, predicted-class) probabilities."""
    x = np.asarray(logits, np.float32)
    shifted = np.exp(x - x.max(axis=-4, keepdims=True))
    total = shifted.sum(axis=-4)
    probabilities = np.stack([shifted[..., TUMOR, :, :, :] / total, 1.0 / total], axis=-4).astype(np.float16)
    return np.argmax(x, axis=-4).astype(np.uint8), probabilities


def check_segmenter_outputs(labels: Any, probabilities: Any, grid: Sequence[int]) -> None:
    """Refuse segmenter outputs (numpy arrays or torch tensors) that do not fit each other or the model grid."""
    n = len(PROBABILITY_CHANNELS)
    if labels.ndim != 3 or probabilities.ndim != 4 or probabilities.shape[0] != n:
        raise ValueError(f"segmenter outputs must be labels (z, y, x) and probabilities ({n}, z, y, x), got shapes "
                         f"{tuple(labels.shape)} and {tuple(probabilities.shape)}")
    if tuple(probabilities.shape[1:]) != tuple(labels.shape):
        raise ValueError(f"probabilities' grid {tuple(probabilities.shape[1:])} differs from the labels' "
                         f"{tuple(labels.shape)}")
    if any(int(g) > n_out for g, n_out in zip(grid, labels.shape, strict=True)):
        raise ValueError(f"model grid {tuple(int(g) for g in grid)} exceeds the segmenter's output grid "
                         f"{tuple(labels.shape)}")


def model_grid_labels(labels: Any, probabilities: Any, grid: Sequence[int]) -> Any:
    """The segmenter's labels on the unpadded model grid (a view; numpy arrays or torch tensors), after checking both
    outputs' shapes."""
    check_segmenter_outputs(labels, probabilities, grid)
    z, y, x = (int(g) for g in grid)
    return labels[:z, :y, :x]


def keep_liver_and_its_tumors(labels: np.ndarray) -> np.ndarray:
    """Keep the largest connected organ (liver + tumor voxels) and drop everything else."""
    out = np.zeros_like(labels)
    if not labels.any():
        return out
    box = bounding_box(labels > 0)  # label only where something was predicted
    organ, _ = ndimage.label(labels[box] > 0, structure=_FULL)
    sizes = np.bincount(organ.ravel())
    sizes[0] = 0
    out[box] = np.where(organ == int(np.argmax(sizes)), labels[box], 0)
    return out


def fill_enclosed(labels: np.ndarray) -> np.ndarray:
    """The organ with every cavity it encloses in 3-D filled in as liver. A liver has no enclosed cavity that is
    not liver (its vessels are liver; the gallbladder and the fissures open to its surface), so an enclosed
    pocket of background is the network's doubt about the parenchyma's texture. Where the scan cuts the organ,
    its first or last slice closes it (the organ goes on beyond). One labelling of the background inside the
    organ's padded box: the pockets that reach no open side of the box."""
    out = labels.copy()
    if not labels.any():
        return out
    box = bounding_box(labels > 0)
    inner = np.pad(labels[box] == 0, 1, constant_values=True)
    inner[0] &= box[0].start > 0  # the scan's first slice cuts the organ: closed there
    inner[-1] &= box[0].stop < labels.shape[0]
    pockets, n = ndimage.label(inner)  # 6-connected background: a pocket touching by a corner stays a pocket
    outside = np.zeros(n + 1, bool)
    outside[np.unique(pockets[[0, -1]])] = True
    outside[np.unique(pockets[:, [0, -1]])] = True
    outside[np.unique(pockets[:, :, [0, -1]])] = True
    outside[0] = True
    enclosed = ~outside[pockets][1:-1, 1:-1, 1:-1]
    out[box] = np.where(enclosed, LIVER, labels[box])
    return out


def to_input_grid(labels: np.ndarray, input_shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Nearest-neighbour labels on the study's grid from labels on the (centred) model grid.

    Only the box around the labelled voxels is gathered (the indices are monotonic, so its image on the
    input grid is a box too); the rest of the study is background without being touched.
    """
    idx = [
        target_indices(int(n_in), SPEC.model_spacing[a] / float(spacing[a]), labels.shape[a])
        for a, n_in in enumerate(input_shape)
    ]
    out = np.zeros(tuple(int(n) for n in input_shape), np.uint8)
    if not labels.any():
        return out
    box = []
    for axis, s in enumerate(bounding_box(labels > 0)):
        lo, hi = np.searchsorted(idx[axis], [s.start, s.stop])
        box.append(slice(int(lo), int(hi)))
    out[tuple(box)] = labels[np.ix_(*(i[b] for i, b in zip(idx, box, strict=True)))]
    return out


def longest_axial_diameter(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Longest in-plane extent (mm) over the axial slices of a (z, y, x) mask: the Feret diameter of its pixels."""
    from scipy.spatial import ConvexHull, QhullError

    sy, sx = float(spacing[1]), float(spacing[2])
    best = 0.0
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float64)
    for sl in mask:
        if not sl.any():
            continue
        edge = sl & ~ndimage.binary_erosion(sl)
        pix = np.argwhere(edge).astype(np.float64)
        pts = (pix[:, None, :] + corners[None]).reshape(-1, 2) * (sy, sx)
        if len(pts) > 32:
            try:
                pts = pts[ConvexHull(pts).vertices]
            except QhullError:
                pass
        d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max()
        best = max(best, float(d))
    return best


def labelled_box(volume: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The tightest box around the nonzero voxels of a 3-D array (labels or a mask), None where there are none:
    one contiguous max-pass over the volume for the slices, then the projections of that slab only."""
    z = np.flatnonzero(volume.reshape(volume.shape[0], -1).max(axis=1)) if volume.size else np.zeros(0, np.int64)
    if z.size == 0:
        return None
    return bounding_box(volume[z[0] : z[-1] + 1] != 0, z_offset=int(z[0]))


def bounding_box(mask: np.ndarray, z_offset: int = 0) -> tuple[slice, slice, slice]:
    """The tightest box around a non-empty 3-D mask, from its projections (10x faster than find_objects)."""
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    inner = mask[z[0] : z[-1] + 1]
    y = np.flatnonzero(inner.any(axis=(0, 2)))
    x = np.flatnonzero(inner.any(axis=(0, 1)))
    return slice(z_offset + z[0], z_offset + z[-1] + 1), slice(y[0], y[-1] + 1), slice(x[0], x[-1] + 1)


def measure(labels: np.ndarray, ct: Any, spacing: Sequence[float],
            confidence_of: Callable[[np.ndarray], float | None] | None = None) -> dict[str, Any]:
    """Findings on the study's grid: liver volume and, per tumor, volume, diameter, centroid, box, mean HU and
    (given ``confidence_of``, which maps a tumor's (n, 3) study voxels to its confidence) the confidence. ``ct`` is
    read by boxes only (``ct[box]``): a numpy array, or a volume on a device that copies just those boxes."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    result: dict[str, Any] = {
        "liver": {"found": False, "volume_ml": 0.0},
        "tumors": [],
        "tumor_burden_ml": 0.0,
        "tumors_not_listed": 0,
    }
    organ_box = labelled_box(labels)  # the study is mostly background: everything below reads boxes only
    if organ_box is None:
        return result
    result["liver"] = {"found": True, "volume_ml": round(float(np.count_nonzero(labels[organ_box])) * voxel_ml, 2)}
    tumor_box = labelled_box(labels[organ_box] == TUMOR)
    if tumor_box is None:
        return result
    box = tuple(slice(o.start + t.start, o.start + t.stop) for o, t in zip(organ_box, tumor_box, strict=True))
    offset = np.array([s.start for s in box])
    tumor_mask = labels[box] == TUMOR
    comp, n = ndimage.label(tumor_mask, structure=_FULL)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    ids = [int(i) + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] * voxel_ml >= SPEC.min_tumor_volume_ml]
    result["tumors_not_listed"] = max(0, len(ids) - SPEC.max_reported_tumors)
    objects = ndimage.find_objects(comp)
    tumors: list[dict[str, Any]] = []
    for i in ids[: SPEC.max_reported_tumors]:
        obj = objects[i - 1]
        m = comp[obj] == i
        volume = float(sizes[i - 1]) * voxel_ml
        voxels = np.argwhere(m)
        local = voxels.mean(axis=0) + [s.start for s in obj] + offset
        start = [int(s.start + o) for s, o in zip(obj, offset, strict=True)]
        stop = [int(s.stop + o) for s, o in zip(obj, offset, strict=True)]
        hu = ct[box][obj][m]
        tumor: dict[str, Any] = {
            "volume_ml": round(volume, 3),
            "longest_axial_diameter_mm": round(longest_axial_diameter(m, spacing), 1),
            "centroid_voxel_zyx": [round(float(c), 2) for c in local],
            "bbox_voxel_zyx": {"start": start, "stop": stop},
            "mean_hu": round(float(hu.mean()), 1),
        }
        if confidence_of is not None:
            conf = confidence_of(voxels + np.asarray(start))
            tumor["confidence"] = None if conf is None else round(conf, 3)
        tumors.append(tumor)
    result["tumors"] = [{"id": k, **t} for k, t in enumerate(tumors, start=1)]  # largest first
    result["tumor_burden_ml"] = round(float(sizes[[i - 1 for i in ids]].sum()) * voxel_ml, 3)
    return result


class ModelGridHU:
    """The study's HU at the centres of the model grid's voxels (nearest), sampled only where it is read: the
    judging reads a sparse lattice for the regions and the organ's box for the lesions, never the whole grid.
    ``ct`` is a numpy array or any volume with ``shape`` and ``gather(index per axis)`` (the GPU flavors' CT
    stays on its device: ``medseg.ops.torch_ops.DeviceVolume``)."""

    def __init__(self, ct: Any, spacing: Sequence[float], grid: Sequence[int]) -> None:
        self.ct = ct
        self.shape = tuple(int(g) for g in grid)
        self.index = [np.floor(source_coordinates(self.shape[a], SPEC.model_spacing[a] / float(spacing[a]),
                                                  ct.shape[a]) + 0.5).astype(np.int64) for a in range(3)]

    def __getitem__(self, box: slice | tuple[slice, ...]) -> np.ndarray:
        box = box if isinstance(box, tuple) else (box,)
        box = box + (slice(None),) * (3 - len(box))
        index = [i[b] for i, b in zip(self.index, box, strict=True)]
        return self.ct[np.ix_(*index)] if isinstance(self.ct, np.ndarray) else self.ct.gather(index)


def hu_on_model_grid(ct: np.ndarray, spacing: Sequence[float], grid: Sequence[int]) -> np.ndarray:
    """The study's HU at the centres of all the model grid's voxels (nearest)."""
    return ModelGridHU(ct, spacing, grid)[:]


def probabilities_box(probabilities: np.ndarray, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """(tumor probability, probability of the predicted class) inside ``box``, float32, from the segmenter's
    float16 probabilities."""
    all_channels_box = (slice(None), *box)  # every channel, then the box (a name: 3.10 has no x[a, *b])
    p = probabilities[all_channels_box].astype(np.float32)
    return p[0], p[1]


# status codes of a study: "ok" reports the liver and its tumors; every other code reports nothing
OK, NOT_CT, REGION, NOT_IN_VIEW, MOSTLY_OUT, IMPLAUSIBLE, LOW_CONFIDENCE = (
    "ok", "not_ct", "region_not_supported", "liver_not_in_view", "liver_mostly_out_of_view", "implausible_liver",
    "low_confidence")


@dataclass
class Verdict:
    """What the judging decided, on the model grid: the labels to report, the status, the tumor candidates."""

    labels: np.ndarray
    status: dict[str, Any]
    candidates: list[Candidate] = field(default_factory=list)
    components: np.ndarray | None = None  # candidates' ids inside ``box``
    box: tuple[slice, slice, slice] | None = None

    @property
    def reported(self) -> bool:
        return bool(self.status["reported"])


def _status(code: str, reason: str, **details: Any) -> dict[str, Any]:
    return {"code": code, "reported": code == OK, "reason": reason, **details}


def judge(labels: np.ndarray, hu: ModelGridHU | np.ndarray,
          probabilities: Callable[[tuple[slice, slice, slice]], tuple[np.ndarray, np.ndarray]]) -> Verdict:
    """Decide what may be reported of the model-grid ``labels`` (argmax), given the study's ``hu`` on the same
    grid (sliced, never read whole) and ``probabilities(box)`` -> (tumor probability, predicted-class
    probability) inside a box."""
    rules = SPEC.plausibility
    empty = np.zeros_like(labels)
    voxel_ml = float(np.prod(SPEC.model_spacing)) / 1000.0
    why = not_a_ct(hu)
    if why:
        return Verdict(empty, _status(NOT_CT, why))
    regions = scan_regions(hu, SPEC.model_spacing)
    scan = regions.describe()
    if not regions.liver_allowed.any():
        return Verdict(empty, _status(REGION, f"the scan shows {regions.summary}: no part of it can hold the liver; "
                                              "this model reads abdominal CT", region=regions.dominant, scan=scan))
    allowed = regions.liver_allowed[:, None, None]
    removed_ml = float(((labels > 0) & ~allowed).sum()) * voxel_ml
    organ = fill_enclosed(keep_liver_and_its_tumors(np.where(allowed, labels, 0).astype(np.uint8)))
    labels = np.where(organ > 0, organ, labels)  # the filled pockets are liver from here on
    keep = organ > 0
    liver_ml = float(keep.sum()) * voxel_ml
    details: dict[str, Any] = {"region": regions.dominant, "scan": scan,
                               "removed_outside_liver_region_ml": round(removed_ml, 1)}
    if liver_ml < 20.0:
        return Verdict(empty, _status(NOT_IN_VIEW, f"no liver found in the scanned region ({regions.summary})",
                                      **details))
    zs = np.flatnonzero(keep.any(axis=(1, 2)))
    cut = {(True, True): "both", (True, False): "bottom", (False, True): "top", (False, False): "none"}[
        (bool(zs[0] == 0), bool(zs[-1] == labels.shape[0] - 1))]
    where = {"both": "at both ends of the scan", "bottom": "at the scan's lower (feet) end",
             "top": "at the scan's upper (head) end", "none": ""}[cut]
    liver = {"volume_in_view_ml": round(liver_ml, 1), "cut_off": cut}
    details["liver"] = liver
    if liver_ml < rules.liver_min_ml:
        if cut != "none":
            return Verdict(empty, _status(MOSTLY_OUT, f"only {liver_ml:.0f} mL of liver, cut off {where}: "
                                                      "the liver is mostly outside the scanned range", **details))
        return Verdict(empty, _status(NOT_IN_VIEW, f"the only liver-like structure holds {liver_ml:.0f} mL "
                                                   f"(a liver in view holds at least {rules.liver_min_ml:.0f} mL)",
                                      **details))
    if liver_ml > rules.liver_max_ml:
        return Verdict(empty, _status(IMPLAUSIBLE, f"a {liver_ml / 1000:.1f} L liver cannot be right (at most "
                                                   f"{rules.liver_max_ml / 1000:.0f} L)", **details))
    pad = 3
    box = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in
                zip(bounding_box(keep), labels.shape, strict=True))
    hu_box = hu[box]
    kept = np.where(keep[box], labels[box], 0).astype(np.uint8)
    pz, _, px = np.nonzero(kept)
    pz, px = pz + box[0].start, px + box[2].start
    mid = regions.midline_x_mm[pz]  # the trunk's centre on each of the liver's voxels' slices
    fallback = np.nanmean(mid) if not np.isnan(mid).all() else labels.shape[2] * SPEC.model_spacing[2] / 2
    right = float(np.mean(px * SPEC.model_spacing[2] < np.where(np.isnan(mid), fallback, mid)))  # x: to the left
    parenchyma = kept == LIVER
    mean_hu = float(hu_box[parenchyma].mean()) if parenchyma.any() else float("nan")
    liver.update(right_fraction=round(right, 3), mean_hu=round(mean_hu, 1))
    if right < rules.liver_min_right_fraction:
        return Verdict(empty, _status(IMPLAUSIBLE, f"{100 * (1 - right):.0f}% of the liver-like structure lies on "
                                                   "the patient's left: not where a liver is", **details))
    if not rules.liver_hu[0] <= mean_hu <= rules.liver_hu[1]:
        return Verdict(empty, _status(IMPLAUSIBLE, f"the liver-like structure's mean {mean_hu:.0f} HU is outside "
                                                   f"{rules.liver_hu[0]:.0f}..{rules.liver_hu[1]:.0f} HU", **details))
    p_tumor, p_max = probabilities(box)  # type: ignore[arg-type]
    confidence = float(p_max[kept > 0].mean())
    liver["confidence"] = round(confidence, 3)
    if confidence < rules.liver_min_confidence:
        return Verdict(empty, _status(LOW_CONFIDENCE, f"the network's confidence in the liver is {confidence:.2f} "
                                                      f"(at least {rules.liver_min_confidence:.2f} is needed)",
                                      **details))
    comp_box, candidates = judge_candidates(kept, p_tumor, hu_box)
    out = empty.copy()
    out[box] = apply_verdicts(kept, comp_box, candidates)
    reason = "liver in view" + ("" if cut == "none" else f", cut off {where} (volume is partial)")
    return Verdict(out, _status(OK, reason, **details), candidates, comp_box, box)  # type: ignore[arg-type]


def _confidence_lookup(verdict: Verdict, input_shape: Sequence[int], spacing: Sequence[float],
                       grid: Sequence[int]) -> Callable[[np.ndarray], float | None]:
    """Maps a tumor's study voxels (n, 3) to the confidence of the model-grid candidate most of them fall in."""
    to_model = [target_indices(int(input_shape[a]), SPEC.model_spacing[a] / float(spacing[a]), int(grid[a]))
                for a in range(3)]
    by_index = {c.index: c.confidence for c in verdict.candidates}

    def lookup(voxels: np.ndarray) -> float | None:
        if verdict.components is None or verdict.box is None:
            return None
        pick = voxels[:: max(1, len(voxels) // 256)]
        local = [to_model[a][pick[:, a]] - verdict.box[a].start for a in range(3)]
        inside = np.all([(v >= 0) & (v < verdict.components.shape[a]) for a, v in enumerate(local)], axis=0)
        ids = verdict.components[tuple(v[inside] for v in local)]
        ids = ids[ids > 0]
        if len(ids) == 0:
            return None
        return by_index.get(int(np.bincount(ids).argmax()))

    return lookup


def _candidates_document(verdict: Verdict, input_shape: Sequence[int], spacing: Sequence[float],
                         grid: Sequence[int]) -> list[dict[str, Any]]:
    """Every tumor candidate (reported or not) with its confidence and centroid on the study's grid: what a FROC
    curve is drawn from."""
    out = []
    box_start = [s.start for s in verdict.box] if verdict.box else [0, 0, 0]
    for c in verdict.candidates:
        study = [float(source_coordinate(c.centroid_zyx[a] + box_start[a], int(grid[a]),
                                         SPEC.model_spacing[a] / float(spacing[a]), int(input_shape[a])))
                 for a in range(3)]
        out.append({"volume_ml": round(c.volume_ml, 3), "confidence": round(c.confidence, 3),
                    "centroid_voxel_zyx": [round(v, 2) for v in study], "reported": c.reported,
                    "rejected_by": c.rejected_by, "reason": c.reason,
                    "contrast_hu": None if c.contrast_hu is None else round(c.contrast_hu, 1),
                    "surface_fraction": round(c.surface_fraction, 2), "thickness_mm": round(2 * c.radius_mm, 1),
                    "length_mm": round(c.length_mm, 1)})
    return out


def postprocess(labels: np.ndarray, probabilities: np.ndarray, grid: Sequence[int], ct: np.ndarray,
                spacing: Sequence[float]) -> tuple[np.ndarray, dict[str, Any]]:
    """The whole postprocessing of the segmenter's (labels, probabilities) on the padded model grid: (labels on the
    study's grid, findings)."""
    labels = model_grid_labels(labels, probabilities, grid)
    verdict = judge(labels, ModelGridHU(ct, spacing, grid), lambda box: probabilities_box(probabilities, box))
    full = to_input_grid(verdict.labels, ct.shape, spacing)
    return full, findings(full, grid, ct, spacing, verdict)


def findings(labels: np.ndarray, grid: Sequence[int], ct: Any, spacing: Sequence[float],
             verdict: Verdict) -> dict[str, Any]:
    """The findings document of labels already on the study's grid (every flavor measures them here)."""
    doc: dict[str, Any] = {"status": verdict.status}
    doc.update(measure(labels, ct, spacing, _confidence_lookup(verdict, ct.shape, spacing, grid)))
    doc["tumor_operating_point"] = {"confidence_threshold": SPEC.tumor_threshold,
                                    "chosen_on": "held-out phantoms, FROC (export/weights/operating_point.json)"}
    doc["tumor_candidates"] = _candidates_document(verdict, ct.shape, spacing, grid)
    doc["model_grid_zyx"] = [int(g) for g in grid]
    doc["study_grid"] = {"shape_zyx": [int(n) for n in ct.shape], "spacing_zyx_mm": [float(s) for s in spacing]}
    return doc


def label_findings(labels: np.ndarray, ct: np.ndarray, spacing: Sequence[float], classes: Sequence[Label]) -> dict[str, Any]:
    """Findings of an imported model's labels on the study's grid: per foreground class its volume, connected
    components (26-connected) and mean HU, measured as the model labelled them (no rules of medseg's own model).
    One pass finds every class's box; each class is then measured inside its own box only, so the cost follows
    what the model labelled, not the study's size times the classes."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    boxes = ndimage.find_objects(labels)  # [value - 1]: the box of that label value, None where it is absent
    out = []
    for lab in classes:
        if lab.value == 0:
            continue
        box = boxes[lab.value - 1] if lab.value <= len(boxes) else None
        n, components, mean_hu = 0, 0, None
        if box is not None:
            mask = labels[box] == lab.value
            n = int(np.count_nonzero(mask))
            components = int(ndimage.label(mask, _FULL)[1])
            mean_hu = round(float(ct[box][mask].mean(dtype=np.float64)), 1)
        out.append({"value": lab.value, "name": lab.name, "volume_ml": round(n * voxel_ml, 2), "voxels": n,
                    "components": components, "mean_hu": mean_hu})
    found = [str(c["name"]) for c in out if c["voxels"]]
    return {
        "status": {"reported": bool(found), "code": "labelled" if found else "nothing_found",
                   "reason": f"the model labelled {', '.join(found)}" if found else "the model labelled no voxel of any class"},
        "labels": out,
        "study_grid": {"shape_zyx": [int(n) for n in ct.shape], "spacing_zyx_mm": [float(s) for s in spacing]},
    }
