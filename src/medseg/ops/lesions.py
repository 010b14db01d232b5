"""Tumor candidates a radiologist can believe: confidence from the network, checks against known false tumors.

Every connected tumor component inside the liver is a candidate. Its confidence is the network's mean tumor
probability over its voxels. A candidate is reported only if it passes, in this order:

- **a mass, not a band**: partial volume where the liver meets fat, ribs or lung gives a thin darker band
  that a network trained on crisp edges calls tumor (seen on real CT: strips 77-80 mm long and under 10 mm
  thick along a healthy liver's edge), and an unenhanced vessel is a dark tube. A tumor is a compact mass:
  a candidate much longer than thick is rejected, sooner when it lies along the liver's surface;
- **visible against the liver around it**: a lesion differs from the parenchyma next to it; a candidate whose
  mean HU is within ``MIN_CONTRAST_HU`` of the liver ring around it has nothing a reader could see;
- **confident enough**: its confidence is at least the operating threshold, chosen on held-out phantoms from
  the FROC curve (``SPEC.tumor_threshold``; ``python -m export.froc``).

All of it runs on the model grid (small), per candidate inside its own box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg_client.spec import LIVER, SPEC, TUMOR

_FULL = np.ones((3, 3, 3), bool)
SURFACE_MM = 3.0  # a voxel this close to outside the organ is at its surface
SURFACE_STRIP = (0.4, 4.0)  # at least this fraction at the surface and this many times longer than thick: a strip
BAND_ELONGATION = 6.0  # this many times longer than thick anywhere: a band or a tube
MIN_CONTRAST_HU = 10.0
RING_MM = (3.0, 9.0)  # the parenchyma around a candidate: this far from it


@dataclass
class Candidate:
    """One tumor component on the model grid and the verdict on it."""

    index: int  # component id in the candidates' label volume
    voxels: int
    volume_ml: float
    confidence: float
    centroid_zyx: tuple[float, float, float]  # model-grid voxel coordinates
    contrast_hu: float | None  # mean HU of the candidate minus the liver ring's median (None: no ring)
    surface_fraction: float
    radius_mm: float  # largest inscribed radius
    length_mm: float  # longest side of its box
    reason: str | None  # why it is not reported, in words; None = reported
    rejected_by: str | None = None  # which check refused it: "shape", "contrast" or "confidence"

    @property
    def reported(self) -> bool:
        return self.reason is None


def _box(mask_box: tuple[slice, ...], pad: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(mask_box, pad, shape, strict=True))


_EPS_MM = 1e-6


def _mm_to_nearest(away: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Per voxel, the distance in mm to the nearest voxel where ``away`` is False (0 there)."""
    return np.asarray(ndimage.distance_transform_edt(away, sampling=spacing))


def judge_candidates(labels: np.ndarray, p_tumor: np.ndarray, hu: np.ndarray,
                     spacing: tuple[float, float, float] = SPEC.model_spacing,
                     threshold: float = SPEC.tumor_threshold) -> tuple[np.ndarray, list[Candidate]]:
    """Candidates of the tumor voxels of ``labels`` (model grid, one organ), each judged; returns the candidates'
    component volume (ids = ``Candidate.index``) and the candidates, largest first. ``p_tumor`` and ``hu``
    are the network's tumor probability and the CT's HU on the same grid."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    comp, n = ndimage.label(labels == TUMOR, structure=_FULL)
    if n == 0:
        return comp, []
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    organ = labels > 0
    pad = tuple(int(np.ceil(RING_MM[1] / s)) + 1 for s in spacing)
    out: list[Candidate] = []
    for i, obj in enumerate(ndimage.find_objects(comp), start=1):
        if obj is None:
            continue
        volume = float(sizes[i]) * voxel_ml
        if volume < SPEC.min_tumor_volume_ml:
            continue
        box = _box(obj, pad, comp.shape)
        m = comp[box] == i
        conf = float(p_tumor[box][m].mean())
        # surface: candidate voxels within SURFACE_MM of a voxel outside the organ (the grid's edge counts as inside);
        # distances in mm from Euclidean distance transforms (what dilating by a ball gives, at a fraction of the cost)
        inside = organ[box]
        surface = float((_mm_to_nearest(inside, spacing)[m] <= SURFACE_MM + _EPS_MM).mean()) if not inside.all() else 0.0
        radius = float(ndimage.distance_transform_edt(np.pad(m, 1), sampling=spacing).max())
        length = float(max((s.stop - s.start) * sp for s, sp in zip(obj, spacing, strict=True)))
        to_candidate = _mm_to_nearest(~m, spacing)
        ring = (to_candidate > RING_MM[0] + _EPS_MM) & (to_candidate <= RING_MM[1] + _EPS_MM) & (labels[box] == LIVER)
        contrast = float(hu[box][m].mean() - np.median(hu[box][ring])) if ring.sum() >= 20 else None
        reason, rejected_by = None, None
        elongation = length / (2 * radius)
        if surface >= SURFACE_STRIP[0] and elongation >= SURFACE_STRIP[1]:
            reason = (f"a strip along the liver's surface ({length:.0f} mm long, {2 * radius:.0f} mm thick): "
                      "partial volume, not a mass")
            rejected_by = "shape"
        elif elongation >= BAND_ELONGATION:
            reason = f"a band or tube ({length:.0f} mm long, {2 * radius:.0f} mm thick), not a mass"
            rejected_by = "shape"
        elif contrast is not None and abs(contrast) < MIN_CONTRAST_HU:
            reason = f"no visible contrast to the liver around it ({contrast:+.0f} HU)"
            rejected_by = "contrast"
        elif conf < threshold:
            reason = f"confidence {conf:.2f} below the operating threshold {threshold:.2f}"
            rejected_by = "confidence"
        centroid = tuple(float(c) for c in np.argwhere(m).mean(axis=0) + [s.start for s in box])
        out.append(Candidate(i, int(sizes[i]), volume, conf, centroid, contrast, surface, radius, length,  # type: ignore[arg-type]
                             reason, rejected_by))
    out.sort(key=lambda c: -c.voxels)
    return comp, out


def apply_verdicts(labels: np.ndarray, comp: np.ndarray, candidates: list[Candidate]) -> np.ndarray:
    """Labels where every tumor voxel that is not part of a reported candidate is liver again."""
    keep = np.zeros(int(comp.max()) + 1, bool)
    for c in candidates:
        keep[c.index] = c.reported
    out = labels.copy()
    out[(labels == TUMOR) & ~keep[comp]] = LIVER
    return out
