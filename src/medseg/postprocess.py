"""Postprocessing math: logits -> clean labels on the study's own grid -> findings.

On the model grid: argmax, keep the largest liver component (liver and tumor voxels together) and
the tumors in or touching it. Then labels go back to the input grid (nearest, same centred-grid
convention as the preprocessing), where the findings are measured at the study's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.preprocess import target_indices
from medseg.spec import SPEC

LIVER = SPEC.label("liver").value
TUMOR = SPEC.label("liver_tumor").value
_FULL = np.ones((3, 3, 3), bool)  # 26-connectivity


def logits_to_labels(logits: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Argmax over classes of (C, Z, Y, X) logits, cropped to the unpadded model grid (uint8)."""
    if logits.ndim != 4 or logits.shape[0] != SPEC.num_classes:
        raise ValueError(f"logits must be (classes={SPEC.num_classes}, z, y, x), got shape {logits.shape}")
    z, y, x = (int(g) for g in grid)
    if z > logits.shape[1] or y > logits.shape[2] or x > logits.shape[3]:
        raise ValueError(f"model grid {tuple(grid)} exceeds the logits' spatial shape {logits.shape[1:]}")
    cropped = logits[:, :z, :y, :x]
    # class by class comparison: as np.argmax (ties go to the lower class), without its strided pass (~40% faster)
    labels = np.zeros((z, y, x), np.uint8)
    best = cropped[0].copy()
    better = np.empty((z, y, x), bool)
    for c in range(1, cropped.shape[0]):
        np.greater(cropped[c], best, out=better)
        np.copyto(labels, np.uint8(c), where=better)
        np.maximum(best, cropped[c], out=best)
    return labels


def keep_liver_and_its_tumors(labels: np.ndarray) -> np.ndarray:
    """Keep the largest connected organ (liver + tumor voxels) and drop everything else."""
    organ, n = ndimage.label(labels > 0, structure=_FULL)
    if n == 0:
        return np.zeros_like(labels)
    sizes = np.bincount(organ.ravel())
    sizes[0] = 0
    keep = organ == int(np.argmax(sizes))
    return np.where(keep, labels, 0).astype(np.uint8)


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


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The tightest box around a non-empty 3-D mask, from its projections (10x faster than find_objects)."""
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    inner = mask[z[0] : z[-1] + 1]
    y = np.flatnonzero(inner.any(axis=(0, 2)))
    x = np.flatnonzero(inner.any(axis=(0, 1)))
    return slice(z[0], z[-1] + 1), slice(y[0], y[-1] + 1), slice(x[0], x[-1] + 1)


def measure(labels: np.ndarray, ct: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Findings on the study's grid: liver volume and, per tumor, volume, diameter, centroid, box, mean HU."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    organ = labels > 0
    result: dict[str, Any] = {
        "liver": {"found": bool(organ.any()), "volume_ml": round(float(organ.sum()) * voxel_ml, 2)},
        "tumors": [],
        "tumor_burden_ml": 0.0,
        "tumors_not_listed": 0,
    }
    if not organ.any():
        return result
    box = bounding_box(organ)
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
        local = np.argwhere(m).mean(axis=0) + [s.start for s in obj] + offset
        start = [int(s.start + o) for s, o in zip(obj, offset, strict=True)]
        stop = [int(s.stop + o) for s, o in zip(obj, offset, strict=True)]
        hu = ct[box][obj][m]
        tumors.append({
            "volume_ml": round(volume, 3),
            "longest_axial_diameter_mm": round(longest_axial_diameter(m, spacing), 1),
            "centroid_voxel_zyx": [round(float(c), 2) for c in local],
            "bbox_voxel_zyx": {"start": start, "stop": stop},
            "mean_hu": round(float(hu.mean()), 1),
        })
    result["tumors"] = [{"id": k, **t} for k, t in enumerate(tumors, start=1)]  # largest first
    result["tumor_burden_ml"] = round(float(sizes[[i - 1 for i in ids]].sum()) * voxel_ml, 3)
    return result


def postprocess(
    logits: np.ndarray, grid: Sequence[int], ct: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, dict[str, Any]]:
    """The whole postprocessing: (labels on the study's grid, findings)."""
    labels = keep_liver_and_its_tumors(logits_to_labels(logits, grid))
    full = to_input_grid(labels, ct.shape, spacing)
    return full, findings(full, grid, ct, spacing)


def findings(labels: np.ndarray, grid: Sequence[int], ct: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """The findings document of labels already on the study's grid (every flavor measures them here)."""
    doc = measure(labels, ct, spacing)
    doc["model_grid_zyx"] = [int(g) for g in grid]
    doc["study_grid"] = {"shape_zyx": [int(n) for n in ct.shape], "spacing_zyx_mm": [float(s) for s in spacing]}
    return doc
