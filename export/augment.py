"""Training augmentations of our own: synthetic tumors, and scans that end inside the liver.

Lesion synthesis: the phantom data hold only a few dozen distinct tumors; without it the network memorises them.
Tumors follow the phantom's own model: ellipsoids of 5-40 mm, 25-60 HU darker than the liver
around them, a soft partial-volume edge and some noise, labelled as tumor only inside the liver.

Scan ends: real scans often stop inside the liver (its dome above an abdominal scan, its tip below a chest
scan); past the last slice the network sees the padding, never a body. Phantoms hold the whole body, so without
this the network reads the padding as the body's end and under-segments the liver next to it.

Both work on preprocessed patches (windowed intensities on the model grid).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medseg.ops.preprocess import PAD_VALUE
from medseg_client.spec import LIVER, SPEC, TUMOR

HU_PER_UNIT = SPEC.hu_window[1] - SPEC.hu_window[0]  # windowed intensity 1.0 spans the window


def paint_tumor(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> bool:
    """Paint one tumor into (1, Z, Y, X) ``image``/``labels`` in place; False if the patch has no liver."""
    liver = np.argwhere(labels[0] == LIVER)
    if len(liver) < 50:
        return False
    centre = liver[rng.integers(len(liver))].astype(np.float64)
    diameter = rng.uniform(5.0, 40.0)
    radii_mm = diameter / 2 * rng.uniform(0.85, 1.15, 3)
    radii = radii_mm / np.asarray(SPEC.model_spacing)  # in voxels along z, y, x
    lo = np.maximum(np.floor(centre - radii - 2), 0).astype(int)
    hi = np.minimum(np.ceil(centre + radii + 3), labels.shape[1:]).astype(int)
    zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    r = np.sqrt(((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
                + ((xx - centre[2]) / radii[2]) ** 2)
    box = (0, slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    in_liver = labels[box] == LIVER
    # soft edge about one model voxel wide, as resampling leaves a rendered tumor
    edge = np.clip((1.0 - r) * min(radii) + 0.5, 0.0, 1.0)
    delta = rng.uniform(25.0, 60.0) / HU_PER_UNIT
    noise = 1.0 + 0.15 * rng.standard_normal(edge.shape)
    image[box] = np.where(in_liver, image[box] - delta * edge * noise, image[box])
    labels[box] = np.where(in_liver & (r <= 1.0), TUMOR, labels[box])
    return True


class RandSyntheticTumord:
    """Dictionary transform: with probability ``prob`` paint 1-3 synthetic tumors into the liver."""

    def __init__(self, prob: float = 0.5, seed: int = 0) -> None:
        self.prob = prob
        self.rng = np.random.default_rng(seed)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.rng.random() >= self.prob:
            return data
        image = np.array(data["image"], dtype=np.float32, copy=True)
        labels = np.array(data["label"], copy=True)
        for _ in range(int(self.rng.integers(1, 4))):
            paint_tumor(image, labels, self.rng)
        return {**data, "image": image, "label": labels}


MIN_CUT_SLICES = 4  # a liver on fewer slices than this is not cut (nothing of it would stay on both sides)


def liver_slices(labels: np.ndarray) -> np.ndarray:
    """The z indices of the slices of (1, Z, Y, X) ``labels`` that hold liver (or tumor), ascending."""
    return np.flatnonzero((labels[0] > 0).any(axis=(1, 2)))


def end_scan(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> bool:
    """End the scan of (1, Z, Y, X) ``image``/``labels`` in place at an axial plane through the liver, towards
    either end: past it the image becomes the preprocessing's padding and the labels background, as served.
    False if the patch has too little liver along z to cut."""
    slices = liver_slices(labels)
    if len(slices) < MIN_CUT_SLICES:
        return False
    cut = int(rng.integers(slices[0] + 1, slices[-1]))
    gone = np.s_[:, cut:] if rng.random() < 0.5 else np.s_[:, :cut]
    image[gone] = PAD_VALUE
    labels[gone] = 0
    return True


class RandScanEndd:
    """Dictionary transform: with probability ``prob`` the patch's scan ends inside its liver (``end_scan``).
    Runs after every intensity augmentation: the padding is exact in what is served."""

    def __init__(self, prob: float = 0.3, seed: int = 0) -> None:
        self.prob = prob
        self.rng = np.random.default_rng(seed + 1)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.rng.random() >= self.prob:
            return data
        image = np.array(data["image"], dtype=np.float32, copy=True)
        labels = np.array(data["label"], copy=True)
        end_scan(image, labels, self.rng)
        return {**data, "image": image, "label": labels}
