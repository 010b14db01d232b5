"""Seeded, deterministic synthetic abdominal CT studies with ground truth (no data set can be downloaded).

A phantom is built in patient space (LPS, mm): a body with skin, subcutaneous fat, muscle wall and
visceral fat with bowel; spine with discs and canal; ribs; aorta and IVC; kidneys; spleen; a lobed
liver with vessels; 0-4 hypodense tumors of 5-40 mm. Array axes are (z, y, x) with z increasing
towards the head; each organ is rendered only inside its bounding box so a 512x512x400 study takes
seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from medseg.spec import SPEC

LIVER = SPEC.label("liver").value
TUMOR = SPEC.label("liver_tumor").value
ROWS = COLS = 512


@dataclass(frozen=True)
class Tumor:
    """A ground-truth tumor: centre (x, y, z in mm, patient LPS), diameter (mm) and contrast (HU)."""

    center_mm: tuple[float, float, float]
    diameter_mm: float
    delta_hu: float


@dataclass
class Phantom:
    """A synthetic CT study: int16 HU volume (z, y, x), its labels, spacing (z, y, x mm) and origin."""

    seed: int
    ct: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin_mm: tuple[float, float, float]  # LPS position of voxel (0, 0, 0): x, y, z
    tumors: list[Tumor] = field(default_factory=list)
    contrast: bool = True

    def describe(self) -> dict[str, object]:
        """A JSON-able summary: geometry and the tumors (no pixel data)."""
        return {
            "seed": self.seed,
            "shape_zyx": list(self.ct.shape),
            "spacing_zyx_mm": list(self.spacing),
            "origin_lps_mm": list(self.origin_mm),
            "contrast_enhanced": self.contrast,
            "tumors": [asdict(t) for t in self.tumors],
        }

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix from (x, y, z) voxel index (column, row, slice) to LPS mm."""
        a = np.eye(4)
        a[0, 0], a[1, 1], a[2, 2] = self.spacing[2], self.spacing[1], self.spacing[0]
        a[:3, 3] = self.origin_mm
        return a


class _Grid:
    """Physical coordinates of voxel centres along each axis (mm, LPS)."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], origin: np.ndarray):
        self.shape = shape
        self.spacing = spacing
        self.z = origin[2] + np.arange(shape[0]) * spacing[0]
        self.y = origin[1] + np.arange(shape[1]) * spacing[1]
        self.x = origin[0] + np.arange(shape[2]) * spacing[2]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices covering the LPS box [lo, hi] (x, y, z order), or None if outside the volume."""
        out = []
        for axis_coords, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            i0 = int(np.searchsorted(axis_coords, a))
            i1 = int(np.searchsorted(axis_coords, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def mesh(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (x, y, z) coordinate arrays for a box of index slices."""
        z = self.z[sl[0]].astype(np.float32)[:, None, None]
        y = self.y[sl[1]].astype(np.float32)[None, :, None]
        x = self.x[sl[2]].astype(np.float32)[None, None, :]
        return x, y, z


def _wobble(rng: np.random.Generator, n: int, amplitude: float, wavelength: tuple[float, float]):  # type: ignore[no-untyped-def]
    """A smooth random field (sum of ``n`` plane waves) for organic surfaces; returns f(x, y, z)."""
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(*wavelength, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    amp = amplitude / np.sqrt(n)

    def f(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32)
        for d, kk, p in zip(dirs, k, phase, strict=True):
            out += np.sin(kk * (d[0] * x + d[1] * y + d[2] * z) + p).astype(np.float32)
        return out * np.float32(amp)

    return f


def _ellipsoid(x, y, z, c, r):  # type: ignore[no-untyped-def]
    """Normalized ellipsoid radius: < 1 inside."""
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def generate(
    seed: int,
    *,
    slice_thickness: float | None = None,
    pixel_spacing: float | None = None,
    num_slices: int | None = None,
) -> Phantom:
    """Make the phantom of ``seed``; keyword overrides pin the geometry (for small test studies)."""
    rng = np.random.default_rng(seed)
    # --- acquisition geometry -------------------------------------------------------------------
    thickness = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]) if rng.random() < 0.6 else rng.uniform(1.0, 5.0))
    pixel = float(rng.uniform(0.6, 0.95))
    coverage = float(rng.uniform(200.0, 420.0))
    thickness = slice_thickness if slice_thickness is not None else round(thickness, 3)
    pixel = pixel_spacing if pixel_spacing is not None else round(pixel, 4)
    nz = num_slices if num_slices is not None else int(np.clip(round(coverage / thickness), 80, 400))
    spacing = (thickness, pixel, pixel)
    fov = ROWS * pixel
    # body centred in-plane; liver dome placed inside the scanned range
    liver_z = float(rng.uniform(-0.15, 0.15) * nz * thickness)
    origin = np.array([-(COLS - 1) / 2 * pixel, -(ROWS - 1) / 2 * pixel, -(nz - 1) / 2 * thickness])
    grid = _Grid((nz, ROWS, COLS), spacing, origin)
    contrast = bool(rng.random() < 0.7)

    # --- body: layered ellipse, slowly varying with z (cached per scale) ---------------------------
    a = float(min(rng.uniform(130, 175), 0.46 * fov))
    b = float(min(rng.uniform(95, 125), 0.85 * a))
    b_off = float(rng.uniform(-10, 10))  # body centre y (AP)
    fat = float(rng.uniform(8, 30))
    muscle = float(rng.uniform(8, 15))
    visceral = float(rng.uniform(-70, -30))
    scale_amp = float(rng.uniform(0.0, 0.06))
    scale_freq = float(rng.uniform(0.005, 0.015))
    xx = grid.x.astype(np.float32)[None, :]
    yy = grid.y.astype(np.float32)[:, None]
    bowel = _wobble(rng, 6, 1.0, (25, 60))
    table_y = b + b_off + float(rng.uniform(15, 40))
    ct = np.full(grid.shape, -1000, np.int16)
    cache: dict[int, np.ndarray] = {}
    inner_a = np.empty(nz, np.float32)
    inner_b = np.empty(nz, np.float32)
    for k, zk in enumerate(grid.z):
        s = 1.0 + scale_amp * np.sin(scale_freq * zk)
        key = round(s * 200)
        sa, sb = a * key / 200, b * key / 200
        inner_a[k], inner_b[k] = sa - fat - muscle, sb - fat - muscle
        if key not in cache:
            r = np.sqrt((xx / sa) ** 2 + ((yy - b_off) / sb) ** 2)
            depth = (1 - r) * (sa + sb) / 2  # approximate distance under the skin, mm
            sl = np.full(r.shape, -1000, np.float32)
            sl[(yy > table_y) & (yy < table_y + 6) & (np.abs(xx) < 0.8 * a + 0 * yy)] = 150
            sl[depth >= 0] = 30
            sl[depth >= 2] = -100
            sl[depth >= fat] = 50
            sl[depth >= fat + muscle] = visceral
            cache[key] = sl
        sl = cache[key].copy()
        inside = sl == visceral
        blob = bowel(xx, yy, np.float32(zk))
        sl[inside & (blob > 0.35)] = 35  # bowel loops
        sl[inside & (blob > 1.05)] = -850  # bowel gas
        ct[k] = sl.astype(np.int16)

    def inner_mask(sl: tuple[slice, slice, slice]) -> np.ndarray:
        x, y, _ = grid.mesh(sl)
        ia = inner_a[sl[0]][:, None, None]
        ib = inner_b[sl[0]][:, None, None]
        return (x / ia) ** 2 + ((y - b_off) / ib) ** 2 < 1.0

    def paint(lo, hi, inside_fn, hu: float) -> None:  # type: ignore[no-untyped-def]
        """Set ``hu`` where ``inside_fn(x, y, z)`` holds within the box [lo, hi] and the body wall."""
        sl = grid.box(np.asarray(lo), np.asarray(hi))
        if sl is None:
            return
        m = np.broadcast_to(inside_fn(*grid.mesh(sl)), ct[sl].shape) & inner_mask(sl)
        ct[sl][m] = int(hu)

    zlo, zhi = float(grid.z[0]), float(grid.z[-1])
    # --- spine, canal, discs, ribs -------------------------------------------------------------------
    spine_y = b + b_off - fat - muscle - float(rng.uniform(25, 40))
    vr = float(rng.uniform(16, 22))
    disc_period = float(rng.uniform(28, 34))
    disc_phase = float(rng.uniform(0, disc_period))

    def vertebra(x, y, z):  # type: ignore[no-untyped-def]
        return (x**2 + (y - spine_y) ** 2) < vr**2 + 0 * z

    spine_box = grid.box(np.array([-vr - 30, spine_y - vr, zlo]), np.array([vr + 30, spine_y + vr + 40, zhi]))
    if spine_box is not None:
        x, y, z = grid.mesh(spine_box)
        rr = np.sqrt(x**2 + (y - spine_y) ** 2)
        disc = ((z - disc_phase) % disc_period) < 7
        body = rr < vr
        region = ct[spine_box]
        region[np.broadcast_to(body, region.shape)] = 260
        region[np.broadcast_to(body & (rr > vr - 2.5), region.shape)] = 750
        region[np.broadcast_to(body & disc, region.shape)] = 90
        canal = (x**2 + (y - spine_y - vr - 10) ** 2) < 8**2
        region[np.broadcast_to(canal, region.shape)] = 15
        ring = (np.abs(np.sqrt(x**2 + (y - spine_y - vr - 10) ** 2) - 12) < 3.5) & ~disc
        region[np.broadcast_to(ring, region.shape)] = 600
        ct[spine_box] = region
    rib_period = float(rng.uniform(22, 30))
    rib_phase = float(rng.uniform(0, rib_period))
    rib_zmax = liver_z + float(rng.uniform(80, 120))
    for k, zk in enumerate(grid.z):
        if zk > rib_zmax or zk < liver_z - 110:
            continue
        ia, ib = inner_a[k] + muscle * 0.5, inner_b[k] + muscle * 0.5
        r = np.sqrt((xx / ia) ** 2 + ((yy - b_off) / ib) ** 2)
        theta = np.arctan2(yy - b_off, xx + 0 * yy)
        # ribs descend anteriorly: the angle band of rib j shifts with z
        band = ((zk - rib_phase + 25 * np.sin(theta)) % rib_period) < 9
        m = (np.abs(r - 1.0) < 4.5 / ((ia + ib) / 2)) & band & (np.abs(np.cos(theta)) > 0.25)
        ct[k][m] = 550

    # --- vessels: aorta and IVC ----------------------------------------------------------------------
    aorta_c = (float(rng.uniform(5, 20)), spine_y - vr - 14)
    ivc_c = (-float(rng.uniform(18, 30)), spine_y - vr - 14)
    for (cx, cy), rad, hu in ((aorta_c, 11.0, 190 if contrast else 40), (ivc_c, 12.0, 130 if contrast else 38)):
        paint((cx - rad, cy - rad, zlo), (cx + rad, cy + rad, zhi),
              lambda x, y, z, cx=cx, cy=cy, rad=rad: ((x - cx) ** 2 + (y - cy) ** 2 < rad**2) & (z < 1e9), hu)

    # --- kidneys and spleen: distractors of similar density ------------------------------------------
    kidney_z = liver_z - float(rng.uniform(60, 90))
    for side in (-1, 1):
        c = (side * float(rng.uniform(55, 75)), spine_y - 5, kidney_z + side * float(rng.uniform(0, 20)))
        r = (float(rng.uniform(25, 32)), float(rng.uniform(20, 27)), float(rng.uniform(45, 60)))
        paint(np.subtract(c, r), np.add(c, r), lambda x, y, z, c=c, r=r: _ellipsoid(x, y, z, c, r) < 1,
              float(rng.uniform(140, 190)) if contrast else float(rng.uniform(28, 38)))
    liver_hu = float(rng.uniform(95, 125) if contrast else rng.uniform(50, 70))
    spleen_c = (float(rng.uniform(70, 100)), float(b_off + rng.uniform(15, 45)), liver_z + float(rng.uniform(-20, 20)))
    spleen_r = (float(rng.uniform(25, 40)), float(rng.uniform(40, 60)), float(rng.uniform(40, 60)))
    spleen_w = _wobble(rng, 5, 0.15, (40, 90))
    paint(np.subtract(spleen_c, spleen_r), np.add(spleen_c, spleen_r),
          lambda x, y, z: _ellipsoid(x, y, z, spleen_c, spleen_r) < 1 + spleen_w(x, y, z),
          liver_hu + float(rng.uniform(-15, 15)))

    # --- liver: lobes with a wobbling surface, vessels, tumors ---------------------------------------
    right_c = (-float(rng.uniform(0.3, 0.45)) * a, b_off - float(rng.uniform(0, 25)), liver_z)
    right_r = (float(rng.uniform(60, 85)), float(rng.uniform(65, 90)), float(rng.uniform(65, 95)))
    left_c = (float(rng.uniform(10, 45)), b_off - float(rng.uniform(0.35, 0.5)) * b, liver_z + float(rng.uniform(0, 40)))
    left_r = (float(rng.uniform(45, 75)), float(rng.uniform(30, 45)), float(rng.uniform(35, 60)))
    lobes = [(right_c, right_r), (left_c, left_r)]
    if rng.random() < 0.4:  # a Riedel lobe hanging down from the right lobe
        lobes.append(((right_c[0] - 10, right_c[1] + 10, liver_z - right_r[2] * 0.8),
                      (float(rng.uniform(25, 35)), float(rng.uniform(25, 40)), float(rng.uniform(40, 60)))))
    liver_w = _wobble(rng, 8, 0.25, (50, 120))
    lo = np.min([np.subtract(c, r) for c, r in lobes], axis=0) - 10
    hi = np.max([np.add(c, r) for c, r in lobes], axis=0) + 10
    labels = np.zeros(grid.shape, np.uint8)
    tumors: list[Tumor] = []
    box = grid.box(lo, hi)
    if box is not None:
        x, y, z = grid.mesh(box)
        w = liver_w(x, y, z)
        liver = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), bool)
        for c, r in lobes:
            liver |= _ellipsoid(x, y, z, c, r) < 1 + w
        liver &= inner_mask(box)
        liver &= ((x - aorta_c[0]) ** 2 + (y - aorta_c[1]) ** 2) > 14**2
        liver &= (x**2 + (y - spine_y) ** 2) > (vr + 8) ** 2
        tex = _wobble(rng, 6, 4.0, (8, 20))(x, y, z)
        vals = liver_hu + tex
        # portal / hepatic vessels: a few tubes through the liver
        for _ in range(int(rng.integers(2, 5))):
            p0 = np.array(right_c) + rng.normal(0, 20, 3)
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            rad = float(rng.uniform(2.5, 6))
            rel = np.stack(np.broadcast_arrays(x - p0[0], y - p0[1], z - p0[2]))
            t = np.tensordot(d, rel, axes=1)
            dist2 = (rel**2).sum(0) - t**2
            vals = np.where(dist2 < rad**2, liver_hu + (35 if contrast else -12), vals)
        region_ct = ct[box]
        region_ct[liver] = vals[liver].astype(np.int16)
        region_lab = labels[box]
        region_lab[liver] = LIVER
        # tumors: centres drawn among liver voxels, kept away from each other
        n_tumors = int(rng.choice([0, 1, 1, 2, 2, 3, 3, 4]))
        idx = np.argwhere(liver)
        for _ in range(n_tumors):
            if len(idx) == 0:
                break
            for _try in range(20):
                iz, iy, ix = idx[rng.integers(len(idx))]
                cen = (float(x[0, 0, ix]), float(y[0, iy, 0]), float(z[iz, 0, 0]))
                if all(np.linalg.norm(np.subtract(cen, t.center_mm)) > (t.diameter_mm / 2 + 25) for t in tumors):
                    break
            diam = float(rng.uniform(5, 40))
            delta = -float(rng.uniform(25, 60))
            tumors.append(Tumor((round(cen[0], 2), round(cen[1], 2), round(cen[2], 2)), round(diam, 2), round(delta, 1)))
            radii = np.array([diam / 2] * 3) * rng.uniform(0.85, 1.15, 3)
            scale = radii / (diam / 2)
            rad_field = np.sqrt(((x - cen[0]) / scale[0]) ** 2 + ((y - cen[1]) / scale[1]) ** 2 + ((z - cen[2]) / scale[2]) ** 2)
            inside = (rad_field < diam / 2) & liver
            # hypodense core, soft rim of partial volume
            edge = np.clip((diam / 2 - rad_field) / 1.5, 0, 1)
            hu_t = region_ct.astype(np.float32) + delta * edge * (1.0 + 0.15 * rng.standard_normal(edge.shape).astype(np.float32))
            region_ct[inside] = hu_t[inside].astype(np.int16)
            region_lab[inside] = TUMOR
        ct[box] = region_ct
        labels[box] = region_lab

    # --- noise ----------------------------------------------------------------------------------------
    sigma = float(rng.uniform(8, 18)) * np.sqrt(2.5 / thickness) ** 0.5
    noise_rng = np.random.default_rng(seed + 1_000_003)
    for k in range(nz):
        n = noise_rng.standard_normal((ROWS, COLS), dtype=np.float32) * np.float32(sigma)
        n = 0.5 * n + 0.25 * (np.roll(n, 1, 0) + np.roll(n, 1, 1))  # mildly correlated, like CT noise
        ct[k] = np.clip(ct[k] + n, -1024, 3071).astype(np.int16)
    return Phantom(
        seed=seed,
        ct=ct,
        labels=labels,
        spacing=spacing,
        origin_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        tumors=tumors,
        contrast=contrast,
    )
