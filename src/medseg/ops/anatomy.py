"""Is this a scan the liver model is meant for, and where can a liver be in it? Pure numpy on the model grid.

A model trained on abdominal CT answers something on any volume: brain becomes "liver", myocardium "tumor".
Before anything is reported the study is read the way a radiologist glances at it:

- **Is it CT at all?** Hounsfield units put air at -1000 and fat near -100; a volume with neither is not a
  CT in HU (an MR, a mislabelled export). A volume whose neighbouring voxels differ as much as any two voxels
  do holds no anatomy (noise).
- **Which body region is each slice?** From physics that holds on any CT: the body's outline (its area, one
  trunk or two legs), air inside the body (lungs), a closed ring of bone (the skull), bone masses on both
  sides of the pelvis (femoral heads). Each slice gets costs for head, neck, chest, abdomen,
  pelvis and legs; a dynamic programme then labels the slices in anatomical order (a body does not go from
  chest to head downwards), which smooths single misleading slices. This is the idea of body-part regression
  (Yan et al.; "Mitigating False Predictions In Unreasonable Body Regions", DKFZ 2024) with hand-written
  evidence instead of a learned score, since no data to learn one from can be shipped here.
- **Where can the liver be?** In the abdomen's slices and the lowest part of the chest (the dome rises into
  it); never in head, neck or leg slices, nor at the level of the femoral heads.

Array axes are (z, y, x) with z towards the head and x towards the patient's left (LPS), as everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

REGIONS = ("head", "neck", "chest", "abdomen", "pelvis", "legs")  # from the top of the body down
HEAD, NECK, CHEST, ABDOMEN, PELVIS, LEGS = range(6)
NO_BODY = -1

AIR_HU, BODY_HU, FAT_HU, BONE_HU = -400.0, -500.0, (-200.0, -30.0), 200.0
ANALYSIS_MM = 3.0  # in-plane pixel of the region analysis
ANALYSIS_Z_MM = 4.0  # and the distance between the slices it reads
SWITCH_COST = 3.0  # evidence it takes to change region between two slices
LIVER_ABOVE_ABDOMEN_MM = 100.0  # the liver's dome reaches this far into the slices that show lungs
LIVER_INTO_PELVIS_MM = 0.0  # pelvis starts at the femoral heads: no liver reaches them
NOISE_ROUGHNESS = 0.7  # neighbour differences vs overall spread: ~1 for noise, 0.1-0.3 for CT


@dataclass
class SliceEvidence:
    """Per-slice measurements of the region analysis (arrays over z)."""

    body_cm2: np.ndarray
    air_fraction: np.ndarray  # air inside the body's outline / the outline's area
    skull: np.ndarray  # a closed ring of bone holding most of the slice
    legs: np.ndarray  # two body parts of similar size side by side
    pelvis: np.ndarray  # bone masses on both sides of the trunk's midline
    midline_x: np.ndarray  # x index (analysis grid) of the trunk's centre
    cropped: np.ndarray  # the body fills the field of view: its outline is unknown


@dataclass
class ScanRegions:
    """The region of every slice and what follows for the liver."""

    per_slice: np.ndarray  # int over z: index into REGIONS, NO_BODY where the slice holds no body
    slice_mm: float
    liver_allowed: np.ndarray  # bool over z
    midline_x_mm: np.ndarray  # the trunk's centre (mm from the grid's first column) per slice, NaN without body
    extent_mm: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """The regions the scan covers, top to bottom, e.g. ``chest 210 mm, abdomen 160 mm``."""
        return ", ".join(f"{name} {mm:.0f} mm" for name, mm in self.extent_mm.items()) or "no body"

    @property
    def dominant(self) -> str:
        return max(self.extent_mm, key=lambda k: self.extent_mm[k]) if self.extent_mm else "none"

    def describe(self) -> dict[str, Any]:
        return {"regions_mm": {k: round(v, 1) for k, v in self.extent_mm.items()}, "dominant": self.dominant,
                "liver_possible_mm": round(float(self.liver_allowed.sum()) * self.slice_mm, 1)}


def not_a_ct(hu: Any) -> str | None:
    """Why ``hu`` (a (z, y, x) array, or anything sliced like one with a ``shape``) cannot be a CT volume in
    Hounsfield units with anatomy in it, or None if it can."""
    sample = np.asarray(hu[:: max(1, hu.shape[0] // 16)], np.float32)  # 16 slices say it
    air = float((sample < BODY_HU).mean())
    fat = float(((sample > FAT_HU[0]) & (sample < FAT_HU[1])).mean())
    if air < 1e-3 and fat < 1e-2:
        return (f"no air (below {BODY_HU:.0f} HU) and no fat ({FAT_HU[0]:.0f} to {FAT_HU[1]:.0f} HU) in the volume: "
                "not a CT in Hounsfield units")
    spread = float(sample.std())
    if spread < 1.0:
        return "the volume is uniform: no anatomy in it"
    step = float(np.diff(sample, axis=2).std()) / np.sqrt(2.0)
    if step / spread > NOISE_ROUGHNESS:
        return (f"neighbouring voxels differ as much as any two voxels (roughness {step / spread:.2f}): noise, "
                "no anatomy")
    return None


_PLANAR_CROSS = np.array([np.zeros((3, 3)), ndimage.generate_binary_structure(2, 1), np.zeros((3, 3))], bool)
_PLANAR_FULL = np.array([np.zeros((3, 3)), np.ones((3, 3)), np.zeros((3, 3))], bool)


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Holes filled in every slice on its own: the background's in-plane components that do not touch the
    slice's border (one labelling for the whole volume; much faster than scipy's iterative fill)."""
    lab, n = ndimage.label(~mask, _PLANAR_CROSS)
    outside = np.zeros(n + 1, bool)
    for face in (lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]):
        outside[face] = True
    outside[0] = True  # the mask itself
    return mask | ~outside[lab]


def _per_slice_sum(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(mask.shape[0], -1).sum(axis=1).astype(np.float64)


def slice_evidence(hu: np.ndarray, pixel_mm: tuple[float, float]) -> SliceEvidence:
    """Measure every slice of ``hu`` (z, y, x) whose in-plane pixel is ``pixel_mm`` (rows, columns); the
    morphology runs on the whole volume at once with in-plane connectivity, so each slice is on its own."""
    px_cm2 = pixel_mm[0] * pixel_mm[1] / 100.0
    nz, _, nx = hu.shape
    ev = SliceEvidence(body_cm2=np.zeros(nz), air_fraction=np.zeros(nz), skull=np.zeros(nz, bool),
                       legs=np.zeros(nz, bool), pelvis=np.zeros(nz, bool), midline_x=np.full(nz, np.nan),
                       cropped=np.zeros(nz, bool))
    min_part = max(1, int(20 / px_cm2))  # 20 cm2: an arm, a leg, a head; not a cable or the table
    open_r = max(1, round(4.0 / min(pixel_mm)))
    body = ndimage.binary_opening(hu > BODY_HU, _PLANAR_CROSS, iterations=open_r)  # drops the table, thin lines
    lab, n = ndimage.label(body, _PLANAR_FULL)
    if n == 0:
        return ev
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    objects = ndimage.find_objects(lab)
    z_of = np.array([o[0].start if o is not None else -1 for o in objects])
    big = np.flatnonzero(sizes[1:] >= min_part) + 1  # ids of the body parts
    if len(big) == 0:
        return ev
    # per slice: the parts, largest first (the trunk), then the runner-up
    order = big[np.lexsort((-sizes[big], z_of[big - 1]))]
    trunk_id = np.zeros(nz, np.int64)
    second_id = np.zeros(nz, np.int64)
    for i in order:
        z = z_of[i - 1]
        if trunk_id[z] == 0:
            trunk_id[z] = i
        elif second_id[z] == 0:
            second_id[z] = i
    keep = np.zeros(n + 1, bool)
    keep[big] = True
    parts = _fill_slices(keep[lab])
    trunk = _fill_slices(lab == trunk_id[:, None, None]) & (trunk_id > 0)[:, None, None]
    trunk_px = _per_slice_sum(trunk)
    ev.body_cm2 = _per_slice_sum(parts) * px_cm2
    edge = np.concatenate([parts[:, 0], parts[:, -1], parts[:, :, 0], parts[:, :, -1]], axis=1)
    ev.cropped = edge.mean(axis=1) > 0.5
    ev.air_fraction = _per_slice_sum(trunk & (hu < AIR_HU)) / np.maximum(trunk_px, 1.0)
    cols = trunk.any(axis=1)  # (z, x)
    has = cols.any(axis=1)
    first = np.argmax(cols, axis=1)
    last = nx - 1 - np.argmax(cols[:, ::-1], axis=1)
    ev.midline_x = np.where(has, (first + last) / 2.0, np.nan)
    half_width = (last - first) / 2.0
    # legs: two parts of similar size side by side
    pairs = np.flatnonzero((second_id > 0) & (sizes[second_id] >= 0.4 * sizes[trunk_id]))
    if len(pairs):
        centres = ndimage.center_of_mass(body, lab, np.concatenate([trunk_id[pairs], second_id[pairs]]))
        for j, z in enumerate(pairs):
            c0, c1 = centres[j], centres[j + len(pairs)]
            ev.legs[z] = abs(c0[2] - c1[2]) * pixel_mm[1] > 60 and abs(c0[1] - c1[1]) * pixel_mm[0] < 80
    # bone: a closed ring holding most of the slice (skull); round masses on both sides (femoral heads)
    bone = trunk & (hu > BONE_HU)
    bone_px = _per_slice_sum(bone)
    ring = _fill_slices(ndimage.binary_closing(bone, _PLANAR_FULL))
    ev.skull = (_per_slice_sum(ring) > 0.6 * trunk_px) & (bone_px > 0.04 * trunk_px)
    ev.pelvis = _femoral_heads(hu, _fill_slices(bone), ev.midline_x, half_width, px_cm2)
    return ev


def _femoral_heads(hu: np.ndarray, bone: np.ndarray, midline: np.ndarray, half_width: np.ndarray,
                   px_cm2: float) -> np.ndarray:
    """Per slice: two round bone masses with a cortex, one on each side of the trunk's midline (femoral heads,
    or the acetabula around them). Ribs are thin arcs, the spine sits on the midline, iliac wings are plates."""
    lab, n = ndimage.label(bone, _PLANAR_FULL)
    out = np.zeros(hu.shape[0], bool)
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    candidates = np.flatnonzero(sizes[1:] * px_cm2 >= 12) + 1
    if len(candidates) == 0:
        return out
    objects = ndimage.find_objects(lab)
    sides: dict[int, set[int]] = {}
    for i in candidates:
        obj = objects[i - 1]
        box_px = (obj[1].stop - obj[1].start) * (obj[2].stop - obj[2].start)
        if sizes[i] < 0.5 * box_px or hu[obj][lab[obj] == i].max() < 600:
            continue
        z = obj[0].start
        cx = obj[2].start + (obj[2].stop - obj[2].start) / 2.0
        if abs(cx - midline[z]) > 0.3 * half_width[z]:
            sides.setdefault(z, set()).add(int(np.sign(cx - midline[z])))
    for z, s in sides.items():
        out[z] = s == {-1, 1}
    return out


def _costs(ev: SliceEvidence) -> np.ndarray:
    """(z, regions) evidence costs: low where the slice looks like the region."""
    nz = len(ev.body_cm2)
    c = np.zeros((nz, len(REGIONS)))
    for k in range(nz):
        if ev.body_cm2[k] <= 0:
            continue
        if ev.skull[k]:
            c[k] += (0, 4, 6, 6, 6, 6)
            continue
        if ev.legs[k]:
            c[k] += (6, 4, 6, 6, 3, 0)
            continue
        air = ev.air_fraction[k]
        if air >= 0.15:  # lungs
            c[k] += (4, 4, 0, 3, 5, 5)
        elif air >= 0.05:  # lung bases, or much bowel gas
            c[k] += (3, 3, 0.5, 0.5, 3, 4)
        else:
            c[k] += (2, 1.5, 2.5, 0, 0.5, 3)
        if not ev.cropped[k]:
            if ev.body_cm2[k] < 180:
                c[k] += (0.5, 0, 3, 3, 3, 1)
            elif ev.body_cm2[k] >= 300:
                c[k] += (3, 3, 0, 0, 0, 2)
        if ev.pelvis[k]:
            c[k] += (3, 3, 3, 1.5, 0, 2)
    return c


def label_slices(costs: np.ndarray, has_body: np.ndarray) -> np.ndarray:
    """Regions per slice in anatomical order (non-decreasing region index from the top slice down) at the
    least total cost, a region change costing SWITCH_COST; NO_BODY where a slice holds no body."""
    nz, nr = costs.shape
    out = np.full(nz, NO_BODY)
    if nz == 0 or not has_body.any():
        return out
    order = np.arange(nz)[::-1]  # top (head end) first
    total = np.zeros((nz, nr))
    back = np.zeros((nz, nr), np.int64)
    total[0] = costs[order[0]]
    for t in range(1, nz):
        prev = total[t - 1]
        # best predecessor with region <= r: a running minimum over regions
        best_idx = np.zeros(nr, np.int64)
        best = np.zeros(nr)
        run_i, run_v = 0, prev[0]
        for r in range(nr):
            if prev[r] < run_v:
                run_i, run_v = r, prev[r]
            best_idx[r] = run_i
            best[r] = run_v
        stay = prev
        switch = best + SWITCH_COST
        choose_stay = stay <= switch
        total[t] = np.where(choose_stay, stay, switch) + costs[order[t]]
        back[t] = np.where(choose_stay, np.arange(nr), best_idx)
    r = int(np.argmin(total[-1]))
    for t in range(nz - 1, -1, -1):
        k = order[t]
        out[k] = r if has_body[k] else NO_BODY
        r = int(back[t, r])
    return out


def scan_regions(hu: Any, spacing: tuple[float, float, float]) -> ScanRegions:
    """Body region of every slice of a (z, y, x) HU volume (or anything sliced like one with a ``shape``) and
    the slices where a liver can be."""
    step = max(1, round(ANALYSIS_MM / max(spacing[1], 1e-6)))
    step_z = max(1, round(ANALYSIS_Z_MM / max(spacing[0], 1e-6)))
    coarse = np.asarray(hu[step_z // 2 :: step_z, ::step, ::step])
    pixel = (spacing[1] * step, spacing[2] * step)
    ev = slice_evidence(coarse, pixel)
    coarse_regions = label_slices(_costs(ev), ev.body_cm2 > 0)
    nearest = np.minimum(np.arange(hu.shape[0]) // step_z, len(coarse_regions) - 1)  # every slice: its analysed one
    per_slice = coarse_regions[nearest]
    dz = float(spacing[0])
    extent: dict[str, float] = {}
    for r in range(len(REGIONS)):
        n = int((per_slice == r).sum())
        if n:
            extent[REGIONS[r]] = n * dz
    allowed = per_slice == ABDOMEN
    chest = np.flatnonzero(per_slice == CHEST)
    if len(chest):
        lowest = int(chest.min())
        allowed |= (per_slice == CHEST) & (np.arange(len(per_slice)) <= lowest + int(LIVER_ABOVE_ABDOMEN_MM / dz))
    pelvis = np.flatnonzero(per_slice == PELVIS)
    if len(pelvis):
        top = int(pelvis.max())
        allowed |= (per_slice == PELVIS) & (np.arange(len(per_slice)) >= top - int(LIVER_INTO_PELVIS_MM / dz))
    midline = ev.midline_x[nearest] * pixel[1]
    return ScanRegions(per_slice, dz, allowed, midline, extent)
