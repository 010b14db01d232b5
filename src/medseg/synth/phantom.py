"""Seeded, deterministic synthetic CT studies with ground truth (no data set can be downloaded).

A phantom is a whole adult body laid out in one anatomical frame (LPS mm, z = 0 at the top of the right
hemidiaphragm): head, neck, chest with lungs, heart and ribs, the diaphragm's domes, an abdomen with a
lobed liver (branching portal and hepatic veins, fissures, steatosis), gallbladder, stomach, spleen,
kidneys, aorta, IVC and bowel, a pelvis with iliac wings, sacrum, bladder and femoral heads, and legs.
A scan is a range of z over that body (``region``): the default ``abdomen`` holds the whole liver;
``chest``, ``head``, ``neck``, ``pelvis`` and ``legs`` hold none of it (hard negatives), ``liver_tip``
only a few centimetres of it, ``chest_abdomen`` and ``abdomen_pelvis`` more of the body. Acquisition
effects that real scans have are rendered too: contrast phase (none, arterial, portal venous, delayed),
partial volume (a point-spread function in-plane and a slice profile along z), correlated noise, beam-
hardening streaks, varied patient sizes and fields of view.

Each part draws from its own random stream (``_rng(seed, part)``): changing one organ's recipe does not
change any other organ of any seed. Array axes are (z, y, x), z increasing towards the head; organs are
rendered only inside their bounding boxes so a 512 x 512 x 400 study takes seconds.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from medseg_client.spec import LIVER, TUMOR

ROWS = COLS = 512
GENERATOR_VERSION = 2
# the organs besides the liver whose voxels a phantom records (Phantom.organs): value by name; the kidneys by the
# patient's side
ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3}

# scan ranges of each region in the body frame (mm; z = 0 at the right dome): (bottom, top) choices
REGIONS = ("abdomen", "chest_abdomen", "abdomen_pelvis", "liver_tip", "chest", "head", "neck", "pelvis", "legs",
           "no_liver")
# regions whose scans hold (most of) the liver; the others hold none of it, or a sliver at most
LIVER_REGIONS = ("abdomen", "chest_abdomen", "abdomen_pelvis")
PHASES = ("none", "arterial", "portal", "delayed")

Field = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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
    region: str = "abdomen"
    phase: str = "portal"
    liver_ml: float = 0.0  # liver (with its tumors) inside the scan
    liver_total_ml: float = 0.0  # the whole organ, in the scan or not
    # other organs' labels (ORGANS' values; 0 elsewhere), for models with more classes than the shipped one's
    organs: np.ndarray | None = None

    def describe(self) -> dict[str, object]:
        """A JSON-able summary: geometry, what the scan holds and the tumors (no pixel data)."""
        return {
            "seed": self.seed,
            "generator_version": GENERATOR_VERSION,
            "region": self.region,
            "phase": self.phase,
            "shape_zyx": list(self.ct.shape),
            "spacing_zyx_mm": list(self.spacing),
            "origin_lps_mm": list(self.origin_mm),
            "contrast_enhanced": self.contrast,
            "liver_in_scan_ml": round(self.liver_ml, 1),
            "liver_total_ml": round(self.liver_total_ml, 1),
            "tumors": [asdict(t) for t in self.tumors],
        }

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix from (x, y, z) voxel index (column, row, slice) to LPS mm."""
        a = np.eye(4)
        a[0, 0], a[1, 1], a[2, 2] = self.spacing[2], self.spacing[1], self.spacing[0]
        a[:3, 3] = self.origin_mm
        return a


def _rng(seed: int, part: str) -> np.random.Generator:
    """The random stream of one part of one phantom: independent of every other part."""
    return np.random.default_rng([seed, zlib.crc32(part.encode())])


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


def _wobble(rng: np.random.Generator, n: int, amplitude: float, wavelength: tuple[float, float]) -> Field:
    """A smooth random field (sum of ``n`` plane waves) for organic surfaces and textures."""
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(*wavelength, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    amp = amplitude / np.sqrt(n)

    def f(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), np.float32)
        for d, kk, p in zip(dirs, k, phase, strict=True):
            out += np.sin(kk * (d[0] * x + d[1] * y + d[2] * z) + p).astype(np.float32)
        return out * np.float32(amp)

    return f


def _ellipsoid(x, y, z, c, r):  # type: ignore[no-untyped-def]
    """Normalized ellipsoid radius: < 1 inside."""
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


@dataclass(frozen=True)
class _Contrast:
    """HU of the enhancing tissues in one contrast phase (before steatosis and texture)."""

    phase: str
    liver: float
    spleen: float
    kidney: float
    aorta: float
    portal: float
    hepatic: float
    myocardium: float
    blood_pool: float
    bowel_wall: float


def _contrast(phase: str, rng: np.random.Generator) -> _Contrast:
    u = rng.uniform
    if phase == "none":
        blood = u(35, 48)
        return _Contrast(phase, u(50, 68), u(40, 52), u(28, 38), blood, blood, blood, u(38, 48), blood, u(30, 42))
    if phase == "arterial":
        return _Contrast(phase, u(62, 90), u(80, 140), u(150, 220), u(230, 400), u(90, 170), u(45, 70), u(85, 125),
                         u(200, 350), u(70, 110))
    if phase == "portal":
        return _Contrast(phase, u(95, 135), u(100, 135), u(140, 200), u(130, 200), u(150, 210), u(130, 185),
                         u(85, 115), u(130, 190), u(70, 110))
    return _Contrast(phase, u(75, 100), u(80, 105), u(110, 160), u(90, 125), u(95, 130), u(90, 125), u(70, 95),
                     u(90, 125), u(55, 85))  # delayed


@dataclass(frozen=True)
class _Body:
    """The patient: size, layers and where the organs sit (all mm in the body frame)."""

    size: float  # the patient's scale (1 = a mid-sized adult): organs scale with it
    a: float  # trunk half-width (x) at the abdomen
    b: float  # trunk half-depth (y)
    y0: float  # trunk centre y
    fat: float
    muscle: float
    visceral: float  # HU of visceral fat
    spine_y: float
    vr: float  # vertebral body radius
    arms: bool  # arms down beside the trunk (else raised out of the field of view)

    def trunk_scale(self, z: float) -> tuple[float, float]:
        """(half-width, half-depth) of the trunk's outline at height z; (0, 0) above the shoulders or below the hips."""
        if z > 290 or z < -470:
            return 0.0, 0.0
        wa, wb = 1.0, 1.0
        if z > 60:  # chest: a little wider, shoulders above 200, rounding off above 250
            t = min((z - 60) / 140, 1.0)
            wa = 1.02 + 0.12 * t
            wb = 0.98 + 0.04 * t
            if z > 250:
                s = np.sqrt(max(1 - ((z - 250) / 42) ** 2, 0.0))
                wa, wb = wa * s, wb * s
        elif z < -240:  # pelvis: wider, then tapering into the thighs
            t = min((-240 - z) / 120, 1.0)
            wa = 1.0 + 0.1 * t
            if z < -400:
                wa *= 1 - 0.25 * (-400 - z) / 70
        return self.a * wa, self.b * wb


def _body(seed: int) -> _Body:
    rng = _rng(seed, "body")
    size = float(rng.uniform(0.82, 1.18))
    a = float(rng.uniform(135, 165)) * size
    b = float(min(rng.uniform(95, 122) * size, 0.85 * a))
    y0 = float(rng.uniform(-10, 10))
    fat = float(rng.uniform(6, 32)) * size
    muscle = float(rng.uniform(8, 15))
    vr = float(rng.uniform(16, 22)) * size**0.5
    spine_y = b + y0 - fat - muscle - float(rng.uniform(25, 40)) * size
    return _Body(size, a, b, y0, fat, muscle, float(rng.uniform(-105, -70)), spine_y, vr, bool(rng.random() < 0.3))


def _diaphragm(seed: int, body: _Body) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """z (mm) of the diaphragm's upper surface over (x, y): two domes (the right one peaking at 0)."""
    rng = _rng(seed, "diaphragm")
    left_top = -float(rng.uniform(10, 28))
    depth = float(rng.uniform(60, 85))
    rx, ry = 0.6 * body.a, 0.95 * body.b
    cr = (-0.42 * body.a, body.y0 - 0.1 * body.b)
    cl = (0.42 * body.a, body.y0)

    def z_of(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        right = 0.0 - depth * (((x - cr[0]) / rx) ** 2 + ((y - cr[1]) / ry) ** 2)
        left = left_top - depth * (((x - cl[0]) / rx) ** 2 + ((y - cl[1]) / ry) ** 2)
        return np.maximum(right, left).astype(np.float32)

    return z_of


def _scan_range(seed: int, region: str, liver_top: float, liver_bottom: float) -> tuple[float, float]:
    """(bottom, top) z of the scan in the body frame for ``region``."""
    rng = _rng(seed, "scan-range")
    u = rng.uniform
    if region in ("abdomen", "no_liver"):
        top = u(15, 60)
        return min(top - u(220, 430), liver_bottom - u(5, 40)), top
    if region == "chest_abdomen":
        return liver_bottom - u(10, 80), u(220, 285)
    if region == "abdomen_pelvis":
        return u(-480, -420), u(15, 50)
    if region == "liver_tip":  # a few centimetres of the liver at one end of the scan
        if rng.random() < 0.5:  # the scan ends just below the dome (a chest scan's last slices)
            return u(-15, -5), u(180, 270)
        return u(-470, -380), liver_bottom + u(15, 30)  # an abdomen-pelvis scan starting at the liver's tip
    if region == "chest":
        return u(25, 55), u(255, 300)
    if region == "head":
        return u(400, 440), u(590, 620)
    if region == "neck":
        return u(275, 300), u(390, 430)
    if region == "pelvis":
        return u(-500, -460), liver_bottom - u(40, 90)
    if region == "legs":
        bottom = u(-1100, -800)
        return bottom, bottom + u(200, 350)
    raise ValueError(f"region must be one of {REGIONS}, got {region!r}")


def generate(
    seed: int,
    *,
    region: str = "abdomen",
    slice_thickness: float | None = None,
    pixel_spacing: float | None = None,
    num_slices: int | None = None,
    phase: str | None = None,
) -> Phantom:
    """Make the phantom of ``seed`` scanned over ``region``; keyword overrides pin the geometry (small test
    studies: ``num_slices`` centres the scan on the liver for the liver regions) and the contrast phase."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    body = _body(seed)
    dia = _diaphragm(seed, body)
    liver_shape = _liver_shape(seed, body)
    # --- acquisition geometry -------------------------------------------------------------------
    rng = _rng(seed, "acquisition")
    thickness = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]) if rng.random() < 0.6 else rng.uniform(1.0, 5.0))
    fov = float(rng.uniform(2 * body.a + 40, 2 * body.a + 190)) if rng.random() < 0.9 else float(2 * body.a - 10)
    fov = float(np.clip(fov, 300, 500))
    pixel = round(pixel_spacing if pixel_spacing is not None else fov / COLS, 4)
    thickness = round(slice_thickness if slice_thickness is not None else thickness, 3)
    bottom, top = _scan_range(seed, region, liver_shape.top, liver_shape.bottom)
    if num_slices is not None:
        nz = int(num_slices)
        if region in LIVER_REGIONS:  # centre the scan on the liver (small test studies hold its middle)
            centre = liver_shape.centre_z + float(rng.uniform(-0.15, 0.15)) * nz * thickness
        else:
            centre = (bottom + top) / 2
        bottom = centre - (nz - 1) / 2 * thickness
    else:
        nz = int(np.clip(round((top - bottom) / thickness), 8, 600))
    spacing = (thickness, pixel, pixel)
    table_offset = float(rng.uniform(-900, 200))  # scanners place z = 0 anywhere
    origin = np.array([-(COLS - 1) / 2 * pixel, -(ROWS - 1) / 2 * pixel + float(rng.uniform(-15, 15)), bottom])
    grid = _Grid((nz, ROWS, COLS), spacing, origin)
    phase_rng = _rng(seed, "phase")
    drawn_phase = str(phase_rng.choice(PHASES, p=[0.25, 0.15, 0.5, 0.1]))
    contrast = _contrast(phase or drawn_phase, phase_rng)

    ct = np.full(grid.shape, -1000.0, np.float32)
    labels = np.zeros(grid.shape, np.uint8)
    organs = np.zeros(grid.shape, np.uint8)
    cavity = _render_body(seed, grid, body, dia, ct, contrast)
    _render_chest(seed, grid, body, dia, ct, cavity, contrast)
    _render_spine_and_vessels(seed, grid, body, dia, ct, cavity, contrast)
    tumors: list[Tumor] = []
    liver_ml = 0.0
    if region != "no_liver":
        tumors = _render_liver(seed, grid, body, dia, liver_shape, ct, labels, cavity, contrast)
        liver_ml = float((labels > 0).sum()) * float(np.prod(spacing)) / 1000.0
    _render_viscera(seed, grid, body, dia, ct, cavity, labels, contrast, organs)
    _render_pelvis_and_legs(seed, grid, body, ct, cavity)
    ct = _acquire(seed, grid, ct, cavity)
    z_shift = table_offset
    tumors = [Tumor((t.center_mm[0], t.center_mm[1], round(t.center_mm[2] + z_shift, 2)), t.diameter_mm, t.delta_hu)
              for t in tumors]
    return Phantom(
        seed=seed,
        ct=ct,
        labels=labels,
        organs=organs,
        spacing=spacing,
        origin_mm=(float(origin[0]), float(origin[1]), float(origin[2] + z_shift)),
        tumors=tumors,
        contrast=contrast.phase != "none",
        region=region,
        phase=contrast.phase,
        liver_ml=liver_ml,
        liver_total_ml=liver_shape.volume_ml if region != "no_liver" else 0.0,
    )


# ------------------------------------------------------------------------------------------------ body


def _render_body(seed: int, grid: _Grid, body: _Body, dia: Callable[..., np.ndarray], ct: np.ndarray,
                 contrast: _Contrast) -> np.ndarray:
    """Skin, fat, muscle wall, head, neck, arms, the table; returns the trunk's inner cavity mask."""
    rng = _rng(seed, "outline")
    xx = grid.x.astype(np.float32)[None, :]
    yy = grid.y.astype(np.float32)[:, None]
    cavity = np.zeros(grid.shape, bool)
    table_y = body.b + body.y0 + float(rng.uniform(8, 30))
    table_curve = float(rng.uniform(0.0005, 0.002))
    head = (float(rng.uniform(70, 80)), float(rng.uniform(88, 100)), 490.0, body.y0 + float(rng.uniform(-5, 10)))
    neck_r = float(rng.uniform(52, 64))
    scalp = float(rng.uniform(4, 7))
    skull = float(rng.uniform(5, 9))
    brain_hu = float(rng.uniform(28, 40))
    skull_hu = float(rng.uniform(700, 1300))
    leg_r = float(rng.uniform(70, 90)) * body.a / 150
    arm_r = float(rng.uniform(38, 48))
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for k, zk in enumerate(grid.z):
        zf = float(zk)
        sl = ct[k]
        # the table: a shallow curved tray under the body
        tray = (yy > table_y - table_curve * xx**2) & (yy < table_y + 5 - table_curve * xx**2) & (np.abs(xx) < 220)
        sl[np.broadcast_to(tray, sl.shape)] = 120
        sa, sb = body.trunk_scale(zf)
        if sa > 20:
            key = (round(sa * 2), round(sb * 2))
            if key not in cache:
                r = np.sqrt((xx / sa) ** 2 + ((yy - body.y0) / sb) ** 2)
                depth = (1 - r) * (sa + sb) / 2  # approximate distance under the skin, mm
                layer = np.full(r.shape, np.nan, np.float32)
                layer[depth >= 0] = 30
                layer[depth >= 2] = -100
                layer[depth >= body.fat] = 50
                inner = depth >= body.fat + body.muscle
                cache[key] = (layer, inner)
            layer, inner = cache[key]
            np.copyto(sl, layer, where=~np.isnan(layer))
            cavity[k] = inner
            sl[inner] = body.visceral
            if body.arms and -250 < zf < 230:  # arms down beside the trunk, humerus inside
                for side in (-1, 1):
                    cx = side * (sa + arm_r + 8)
                    d = np.sqrt((xx - cx) ** 2 + (yy - body.y0) ** 2)
                    sl[np.broadcast_to(d < arm_r, sl.shape)] = -90
                    sl[np.broadcast_to(d < arm_r - 8, sl.shape)] = 50
                    sl[np.broadcast_to(d < 13, sl.shape)] = 900
                    sl[np.broadcast_to(d < 8, sl.shape)] = 40
        if 260 < zf < 430:  # neck: muscle around a cervical spine, airway, vessels
            d = np.sqrt(xx**2 + (yy - body.y0 - 5) ** 2)
            neck = np.broadcast_to(d < neck_r, sl.shape)
            sl[neck & (sl < -500)] = -90
            sl[np.broadcast_to(d < neck_r - 6, sl.shape)] = 50
            sl[np.broadcast_to((xx**2 + (yy - body.y0 - 20) ** 2) < 12**2, sl.shape)] = 650  # cervical vertebra
            sl[np.broadcast_to((xx**2 + (yy - body.y0 + 22) ** 2) < 9**2, sl.shape)] = -1000  # trachea
            for side in (-1, 1):
                sl[np.broadcast_to(((xx - side * 22) ** 2 + (yy - body.y0 + 5) ** 2) < 5**2, sl.shape)] = contrast.aorta
                sl[np.broadcast_to(((xx - side * 30) ** 2 + (yy - body.y0 + 2) ** 2) < 6**2, sl.shape)] = contrast.portal
        ha, hb, hz, hy = head
        if zf > 390:  # head: scalp, skull, brain with ventricles
            s2 = 1 - ((zf - hz) / 118) ** 2
            if s2 > 0:
                s = float(np.sqrt(s2))
                r = np.sqrt((xx / (ha * s)) ** 2 + ((yy - hy) / (hb * s)) ** 2)
                depth = (1 - r) * (ha + hb) * s / 2
                sl[np.broadcast_to(depth >= 0, sl.shape)] = 40
                sl[np.broadcast_to(depth >= scalp, sl.shape)] = skull_hu
                sl[np.broadcast_to(depth >= scalp + skull, sl.shape)] = brain_hu
                vent = ((xx / 14) ** 2 + ((yy - hy + 5) / 30) ** 2 < 1) & (abs(zf - hz - 10) < 25)
                sl[np.broadcast_to(vent, sl.shape)] = 8
        if zf < -470:  # legs: fat, muscle, femur with marrow
            t = min((-470 - zf) / 500, 1.0)
            rl = leg_r * (1 - 0.35 * t)
            for side in (-1, 1):
                cx = side * (0.5 * body.a + 0.2 * rl)
                d = np.sqrt((xx - cx) ** 2 + (yy - body.y0) ** 2)
                sl[np.broadcast_to(d < rl, sl.shape)] = -95
                sl[np.broadcast_to(d < rl - body.fat * 0.7, sl.shape)] = 52
                fem = np.sqrt((xx - cx * 0.92) ** 2 + (yy - body.y0 + 5) ** 2)
                sl[np.broadcast_to(fem < 15, sl.shape)] = 1200
                sl[np.broadcast_to(fem < 10, sl.shape)] = -20
    return cavity


def _render_chest(seed: int, grid: _Grid, body: _Body, dia: Callable[..., np.ndarray], ct: np.ndarray,
                  cavity: np.ndarray, contrast: _Contrast) -> None:
    """Lungs, mediastinum, heart, aorta, airway, ribs and sternum: everything above the diaphragm."""
    rng = _rng(seed, "chest")
    box = _trunk_box(grid, body, 1.3, -160.0, 300.0)
    if box is None:
        return
    x, y, z = grid.mesh(box)
    region = ct[box]
    cav = cavity[box]
    above = (z > dia(x, y)) & (z < 270)
    chest = cav & above
    lung_tex = _wobble(rng, 8, 25.0, (6, 25))
    lung_hu = float(rng.uniform(-880, -800))
    lungs = chest & ((np.abs(x - 8) > 26) | (y > body.spine_y - body.vr - 25))  # the mediastinum between them
    lungs &= ~((np.abs(x - 4) < body.vr + 14) & (y > body.spine_y - body.vr - 25))  # spine and aorta behind
    region[chest] = body.visceral + 20  # mediastinal fat
    region[lungs] = np.broadcast_to(lung_hu + lung_tex(x, y, z), lungs.shape)[lungs]
    # small pulmonary vessels: sparse bright dots
    dots = _wobble(rng, 12, 1.0, (5, 12))(x, y, z)
    region[lungs & (dots > 0.78)] = float(rng.uniform(-150, 40))
    # heart on the diaphragm, left of the midline: pericardial fat, myocardium, blood pool
    hc = (float(rng.uniform(20, 40)), body.y0 - float(rng.uniform(15, 35)), float(rng.uniform(50, 70)))
    hr = tuple(float(v) * body.size for v in (rng.uniform(52, 66), rng.uniform(42, 54), rng.uniform(48, 60)))
    e = _ellipsoid(x, y, z, hc, hr)
    sits = z > dia(x, y) + 2
    region[(e < 1.25) & sits & cav] = body.visceral + 10
    heart = (e < 1) & sits & cav
    region[heart] = contrast.myocardium
    inner = (_ellipsoid(x, y, z, hc, (hr[0] - 11, hr[1] - 11, hr[2] - 11)) < 1) & sits
    region[inner & cav] = contrast.blood_pool
    # ascending aorta and airway above the heart; descending aorta beside the spine
    asc = ((x - 10) ** 2 + (y - body.y0 + 20) ** 2 < 15**2) & (z > hc[2]) & (z < 215)
    region[asc & cav] = contrast.aorta
    trachea = (x**2 + (y - body.y0) ** 2 < 9**2) & (z > 190) & (z < 290)
    region[trachea & cav] = -1000
    # ribs: rings descending anteriorly, from the shoulders down to the lower chest wall
    rib_period = float(rng.uniform(22, 30))
    rib_phase = float(rng.uniform(0, rib_period))
    sa = np.array([body.trunk_scale(float(zz))[0] for zz in grid.z[box[0]]], np.float32)[:, None, None]
    sb = np.array([body.trunk_scale(float(zz))[1] for zz in grid.z[box[0]]], np.float32)[:, None, None]
    ia = np.maximum(sa - body.fat - body.muscle * 0.5, 1)
    ib = np.maximum(sb - body.fat - body.muscle * 0.5, 1)
    r = np.sqrt((x / ia) ** 2 + ((y - body.y0) / ib) ** 2)
    theta = np.arctan2(y - body.y0, x)
    band = ((z - rib_phase + 25 * np.sin(theta)) % rib_period) < 9
    ribs = (np.abs(r - 1.0) < 4.5 / ((ia + ib) / 2)) & band & (np.abs(np.cos(theta)) > 0.2) & (z > -150) & (z < 260)
    region[ribs] = 550
    sternum = (np.abs(x) < 14) & (np.abs(y - (body.y0 - ib + 4)) < 6) & (z > 20) & (z < 240)
    region[sternum] = 450
    ct[box] = region


def _trunk_box(grid: _Grid, body: _Body, margin: float, z_lo: float, z_hi: float) -> tuple[slice, slice, slice] | None:
    """Index slices of the trunk's box (its outline times ``margin`` in-plane) between two heights."""
    return grid.box(np.array([-body.a * margin, body.y0 - body.b * margin, z_lo]),
                    np.array([body.a * margin, body.y0 + body.b * margin, z_hi]))


def _painter(grid: _Grid, ct: np.ndarray, cavity: np.ndarray, labels: np.ndarray,
             dia: Callable[..., np.ndarray], organs: np.ndarray | None = None) -> Callable[..., None]:
    """paint(lo, hi, inside, hu, under_diaphragm=True, organ=0): set ``hu`` (a number or a field) where
    ``inside(x, y, z)`` holds within the LPS box [lo, hi], the trunk's cavity and outside the liver (organs yield to
    it); ``organs`` records ``organ`` there (0: what is painted is no organ of ORGANS, or no longer)."""

    def paint(lo3, hi3, inside: Callable[..., np.ndarray], hu: float | Callable[..., np.ndarray],  # type: ignore[no-untyped-def]
              under_diaphragm: bool = True, organ: int = 0) -> None:
        sl = grid.box(np.asarray(lo3, float), np.asarray(hi3, float))
        if sl is None:
            return
        x, y, z = grid.mesh(sl)
        m = np.broadcast_to(inside(x, y, z), ct[sl].shape) & cavity[sl] & (labels[sl] == 0)
        if under_diaphragm:
            m = m & (z <= dia(x, y) - 4)
        reg = ct[sl]
        reg[m] = hu if not callable(hu) else np.broadcast_to(hu(x, y, z), reg.shape)[m]
        if organs is not None:
            organs[sl][m] = organ

    return paint


def _render_spine_and_vessels(seed: int, grid: _Grid, body: _Body, dia: Callable[..., np.ndarray], ct: np.ndarray,
                              cavity: np.ndarray, contrast: _Contrast) -> None:
    """The diaphragm's muscle, the spine (vertebral bodies, discs, canal, posterior ring), aorta and IVC."""
    rng = _rng(seed, "spine-vessels")
    box = _trunk_box(grid, body, 1.2, -480.0, 40.0)
    if box is not None:
        x, y, z = grid.mesh(box)
        region = ct[box]
        d = dia(x, y)
        region[cavity[box] & (z <= d) & (z > d - 4)] = 45
    vr = body.vr
    disc_period = float(rng.uniform(28, 34))
    disc_phase = float(rng.uniform(0, disc_period))
    spine_box = grid.box(np.array([-vr - 30, body.spine_y - vr, -430.0]), np.array([vr + 30, body.spine_y + vr + 40, 275.0]))
    if spine_box is not None:
        x, y, z = grid.mesh(spine_box)
        rr = np.sqrt(x**2 + (y - body.spine_y) ** 2)
        disc = ((z - disc_phase) % disc_period) < 7
        bone = rr < vr
        reg = ct[spine_box]
        reg[np.broadcast_to(bone, reg.shape)] = 260
        reg[np.broadcast_to(bone & (rr > vr - 2.5), reg.shape)] = 750
        reg[np.broadcast_to(bone & disc, reg.shape)] = 90
        canal = (x**2 + (y - body.spine_y - vr - 10) ** 2) < 8**2
        reg[np.broadcast_to(canal, reg.shape)] = 15
        ring = (np.abs(np.sqrt(x**2 + (y - body.spine_y - vr - 10) ** 2) - 12) < 3.5) & ~disc
        reg[np.broadcast_to(ring, reg.shape)] = 600
    paint = _painter(grid, ct, cavity, np.zeros(grid.shape, np.uint8), dia)
    aorta_c = (float(rng.uniform(5, 20)), body.spine_y - vr - 14)
    ivc_c = (-float(rng.uniform(18, 30)), body.spine_y - vr - 14)
    paint((aorta_c[0] - 12, aorta_c[1] - 12, -300), (aorta_c[0] + 12, aorta_c[1] + 12, 210),
          lambda x, y, z: (x - aorta_c[0]) ** 2 + (y - aorta_c[1]) ** 2 < 11**2, contrast.aorta, under_diaphragm=False)
    paint((ivc_c[0] - 13, ivc_c[1] - 13, -300), (ivc_c[0] + 13, ivc_c[1] + 13, 25),
          lambda x, y, z: (x - ivc_c[0]) ** 2 + (y - ivc_c[1]) ** 2 < 12**2, (contrast.aorta + contrast.portal) / 2,
          under_diaphragm=False)


def _render_viscera(seed: int, grid: _Grid, body: _Body, dia: Callable[..., np.ndarray], ct: np.ndarray,
                    cavity: np.ndarray, labels: np.ndarray, contrast: _Contrast, organs: np.ndarray | None = None) -> None:
    """Bowel, kidneys, spleen, stomach and pancreas below the diaphragm; each yields to the liver."""
    rng = _rng(seed, "viscera")
    box = _trunk_box(grid, body, 1.2, -480.0, 40.0)
    if box is not None:
        x, y, z = grid.mesh(box)
        region = ct[box]
        free = cavity[box] & (z <= dia(x, y) - 4) & (labels[box] == 0) & (region == body.visceral) & (z < -40)
        bowel = _wobble(rng, 6, 1.0, (25, 60))(x, y, z)
        loops = free & (bowel > 0.35)
        region[loops] = contrast.bowel_wall - 35
        if rng.random() < 0.25:  # positive oral contrast in some bowel loops
            region[loops & (bowel > 0.7)] = float(rng.uniform(150, 350))
        region[free & (bowel > 1.05)] = -900  # gas
    paint = _painter(grid, ct, cavity, labels, dia, organs)
    aorta_y = body.spine_y - body.vr - 14
    kidney_z = -float(rng.uniform(95, 130))
    for side in (-1, 1):
        c = (side * float(rng.uniform(55, 75)) * body.a / 150, body.spine_y - 5, kidney_z + side * float(rng.uniform(0, 20)))
        r = tuple(float(v) * body.size for v in (rng.uniform(25, 32), rng.uniform(20, 27), rng.uniform(45, 60)))
        cortex, medulla = contrast.kidney, contrast.kidney - (60 if contrast.phase == "arterial" else 15)
        kidney = ORGANS["kidney_right" if side < 0 else "kidney_left"]  # LPS: x < 0 is the patient's right
        paint(np.subtract(c, r), np.add(c, r), lambda x, y, z, c=c, r=r: _ellipsoid(x, y, z, c, r) < 1, cortex,
              organ=kidney)
        ri = (r[0] - 7, r[1] - 7, r[2] - 7)
        paint(np.subtract(c, ri), np.add(c, ri), lambda x, y, z, c=c, ri=ri: _ellipsoid(x, y, z, c, ri) < 1, medulla,
              organ=kidney)
    # spleen: under the left dome, posterior-lateral, liver-like density
    spleen_c = (0.6 * body.a, body.y0 + 0.3 * body.b, -float(rng.uniform(35, 70)))
    spleen_r = tuple(float(v) * body.size for v in (rng.uniform(22, 35), rng.uniform(40, 58), rng.uniform(40, 60)))
    spleen_w = _wobble(rng, 5, 0.15, (40, 90))
    paint(np.subtract(spleen_c, spleen_r) - 10, np.add(spleen_c, spleen_r) + 10,
          lambda x, y, z: _ellipsoid(x, y, z, spleen_c, spleen_r) < 1 + spleen_w(x, y, z), contrast.spleen,
          organ=ORGANS["spleen"])
    # stomach: left upper quadrant, enhancing wall, fluid (or oral contrast), an air cap anteriorly (supine)
    st_c = (0.28 * body.a, body.y0 - 0.25 * body.b, -float(rng.uniform(30, 60)))
    st_r = tuple(float(v) * body.size for v in (rng.uniform(35, 55), rng.uniform(30, 45), rng.uniform(45, 65)))
    fluid = float(rng.uniform(0, 25)) if rng.random() < 0.8 else float(rng.uniform(150, 350))
    level = st_c[1] - st_r[1] * float(rng.uniform(0.2, 0.7))
    paint(np.subtract(st_c, st_r), np.add(st_c, st_r), lambda x, y, z: _ellipsoid(x, y, z, st_c, st_r) < 1,
          contrast.bowel_wall)
    st_ri = (st_r[0] - 4, st_r[1] - 4, st_r[2] - 4)
    paint(np.subtract(st_c, st_ri), np.add(st_c, st_ri),
          lambda x, y, z: _ellipsoid(x, y, z, st_c, st_ri) < 1,
          lambda x, y, z: np.where(y < level, -1000.0, fluid).astype(np.float32))
    # pancreas: a soft-tissue band across the spine in front of the aorta
    pz = kidney_z + float(rng.uniform(25, 45))
    paint((-60, aorta_y - 40, pz - 15), (70, aorta_y - 10, pz + 15),
          lambda x, y, z: (((y - aorta_y + 25 - 0.12 * x) / 9) ** 2 + ((z - pz) / 12) ** 2 < 1) & (x > -55) & (x < 65),
          contrast.liver * 0.75)


def _render_pelvis_and_legs(seed: int, grid: _Grid, body: _Body, ct: np.ndarray, cavity: np.ndarray) -> None:
    """Iliac wings, sacrum, femoral heads and the bladder."""
    rng = _rng(seed, "pelvis")
    box = _trunk_box(grid, body, 1.3, -500.0, -220.0)
    if box is None:
        return
    x, y, z = grid.mesh(box)
    region = ct[box]
    cav = cavity[box]
    crest = -float(rng.uniform(240, 265))
    for side in (-1, 1):  # the ilium: a curved bony plate, posterolateral, from the crest down to the acetabulum
        cx, cy = side * 0.35 * body.a, body.y0 + 0.15 * body.b
        d = np.sqrt(((x - cx) / (0.45 * body.a)) ** 2 + ((y - cy) / (0.55 * body.b)) ** 2)
        plate = (np.abs(d - 1.0) < 0.09) & (side * (x - cx) > -0.2 * body.a) & (y > cy - 0.5 * body.b) & (z < crest) & (z > -400)
        region[plate & cav] = 700
        # femoral head in its acetabulum, inside the hip's muscle (not only the cavity)
        r_head = 23.0 * body.size**0.5
        head_c = (side * 0.4 * body.a, body.y0 + 5, -430.0)
        fh = _ellipsoid(x, y, z, head_c, (r_head, r_head, r_head))
        in_body = region > -500
        region[(fh < 1.35) & in_body] = 700  # acetabular rim
        region[(fh < 1) & in_body] = 900
        region[(fh < 0.75) & in_body] = 280
    sacrum = (np.abs(x) < 45 - 0.1 * (crest - z)) & (np.abs(y - body.spine_y) < body.vr) & (z < crest - 20) & (z > -400)
    region[sacrum & cav] = 500
    bl_c = (0.0, body.y0 - 0.35 * body.b, -float(rng.uniform(400, 430)))
    bl_r = (float(rng.uniform(35, 55)), float(rng.uniform(28, 40)), float(rng.uniform(28, 40)))
    region[(_ellipsoid(x, y, z, bl_c, bl_r) < 1) & cav] = float(rng.uniform(2, 18))
    ct[box] = region


# ------------------------------------------------------------------------------------------------ liver


@dataclass(frozen=True)
class _LiverShape:
    lobes: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...]
    wobble_seed: int
    top: float
    bottom: float
    centre_z: float
    volume_ml: float


def _liver_shape(seed: int, body: _Body) -> _LiverShape:
    """Lobes (ellipsoids with a wobbling surface) filling the right dome; its extent in z and total volume."""
    rng = _rng(seed, "liver-shape")
    a, b = body.a, body.b
    s = body.size
    right_r = (float(rng.uniform(60, 85)) * s, float(rng.uniform(65, 90)) * s, float(rng.uniform(70, 95)) * s)
    right_c = (-float(rng.uniform(0.3, 0.45)) * a, body.y0 - float(rng.uniform(0, 25)),
               -right_r[2] * float(rng.uniform(0.55, 0.75)))
    left_r = (float(rng.uniform(45, 75)) * s, float(rng.uniform(30, 45)) * s, float(rng.uniform(35, 55)) * s)
    left_c = (float(rng.uniform(10, 45)), body.y0 - float(rng.uniform(0.35, 0.5)) * b, right_c[2] + float(rng.uniform(10, 40)))
    lobes = [(right_c, right_r), (left_c, left_r)]
    if rng.random() < 0.35:  # a Riedel lobe hanging down from the right lobe
        lobes.append(((right_c[0] - 10, right_c[1] + 10, right_c[2] - right_r[2] * 0.8),
                      (float(rng.uniform(25, 35)) * s, float(rng.uniform(25, 40)) * s, float(rng.uniform(35, 55)) * s)))
    bottom = min(c[2] - r[2] for c, r in lobes)
    # volume: the lobes' union below the dome, estimated on a coarse grid (4 mm)
    lo = np.min([np.subtract(c, r) for c, r in lobes], axis=0)
    hi = np.max([np.add(c, r) for c, r in lobes], axis=0)
    xs, ys, zs = (np.arange(lo[i], hi[i], 4.0, dtype=np.float32) for i in range(3))
    x, y, z = xs[None, None, :], ys[None, :, None], zs[:, None, None]
    inside = np.zeros((len(zs), len(ys), len(xs)), bool)
    for c, r in lobes:
        inside |= _ellipsoid(x, y, z, c, r) < 1
    inside &= z < _diaphragm(seed, body)(x, y) - 4
    inner_a, inner_b = body.a - body.fat - body.muscle, body.b - body.fat - body.muscle
    inside &= (x / inner_a) ** 2 + ((y - body.y0) / inner_b) ** 2 < 1  # the trunk's cavity
    volume = float(inside.sum()) * 64 / 1000
    top = float(zs[np.flatnonzero(inside.any(axis=(1, 2)))[-1]]) if inside.any() else 0.0
    return _LiverShape(tuple(lobes), int(rng.integers(1 << 30)), top, float(bottom), float((top + bottom) / 2), volume)


def _vessel_tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, radius: float, length: float,
                 depth: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (start, end, radius) of a randomly branching tube, thinning at each fork."""
    out = []
    d = direction / np.linalg.norm(direction)
    end = root + d * length
    out.append((root, end, radius))
    if depth > 0 and radius > 2.0:
        for _ in range(2):
            nd = d + rng.normal(0, 0.7, 3)
            out += _vessel_tree(rng, end, nd, radius * float(rng.uniform(0.6, 0.8)), length * float(rng.uniform(0.6, 0.9)),
                                depth - 1)
    return out


def _capsule_distance2(x, y, z, p0: np.ndarray, p1: np.ndarray):  # type: ignore[no-untyped-def]
    """Squared distance from points to the segment p0-p1."""
    d = p1 - p0
    L2 = float(d @ d)
    rx, ry, rz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / L2, 0, 1)
    return (rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2


def _render_liver(seed: int, grid: _Grid, body: _Body, dia: Callable[..., np.ndarray], shape: _LiverShape,
                  ct: np.ndarray, labels: np.ndarray, cavity: np.ndarray, contrast: _Contrast) -> list[Tumor]:
    """The liver (parenchyma, vessels, fissures, steatosis), the gallbladder in its fossa, and 0-4 tumors."""
    rng = _rng(seed, "liver")
    lo = np.min([np.subtract(c, r) for c, r in shape.lobes], axis=0) - 12
    hi = np.max([np.add(c, r) for c, r in shape.lobes], axis=0) + 12
    box = grid.box(lo, hi)
    if box is None:
        return []
    x, y, z = grid.mesh(box)
    w = _wobble(np.random.default_rng(shape.wobble_seed), 8, 0.25, (50, 120))(x, y, z)
    liver = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), bool)
    for c, r in shape.lobes:
        liver |= _ellipsoid(x, y, z, c, r) < 1 + w
    liver &= cavity[box] & (z < dia(x, y) - 4)
    region_ct = ct[box]
    region_lab = labels[box]
    # the liver yields to what is already there (spine, ribs, aorta, IVC, the diaphragm); the viscera come after it
    liver &= region_ct == body.visceral
    steatosis = float(rng.uniform(15, 55)) if rng.random() < 0.25 else 0.0
    base = contrast.liver - steatosis * (1.0 if contrast.phase == "none" else 0.8)
    tex = _wobble(rng, 6, float(rng.uniform(3, 8)), (8, 20))(x, y, z)
    patchy = _wobble(rng, 4, float(rng.uniform(0, 10)) if steatosis else 0.0, (30, 80))(x, y, z)
    vals = np.broadcast_to(base + tex + patchy, liver.shape).astype(np.float32)
    # portal tree from the hilum, hepatic veins converging on the IVC under the dome
    right_c = np.asarray(shape.lobes[0][0])
    hilum = right_c + np.array([25.0, 15.0, -10.0])
    segments = _vessel_tree(rng, hilum, np.array([-1.0, 0.2, 0.3]), float(rng.uniform(5, 8)), 35, 3)
    segments += _vessel_tree(rng, hilum, np.array([1.0, -0.3, 0.2]), float(rng.uniform(4, 6)), 30, 2)
    portal_n = len(segments)
    ivc_top = np.array([-float(rng.uniform(18, 30)), body.spine_y - body.vr - 14, shape.top - 15])
    for dx in (-1.0, 0.0, 1.0):
        segments += _vessel_tree(rng, ivc_top, np.array([dx, -0.6, -0.5]), float(rng.uniform(4, 6)), 35, 2)
    for i, (p0, p1, rad) in enumerate(segments):
        seg_lo = np.minimum(p0, p1) - rad
        seg_hi = np.maximum(p0, p1) + rad
        sub = grid.box(np.maximum(seg_lo, lo), np.minimum(seg_hi, hi))
        if sub is None:
            continue
        local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sub, box, strict=True))
        xs, ys, zs = grid.mesh(sub)
        inside = _capsule_distance2(xs, ys, zs, p0, p1) < rad**2
        hu = contrast.portal if i < portal_n else contrast.hepatic
        vals[local] = np.where(inside, np.float32(hu), vals[local])
    region_ct[liver] = vals[liver]
    region_lab[liver] = LIVER
    # fissures: thin fat planes cutting into the liver from its surface (falciform ligament, ligamentum venosum)
    for _ in range(int(rng.integers(1, 3))):
        n = rng.normal(size=3)
        n[2] *= 0.2
        n /= np.linalg.norm(n)
        p = np.asarray(shape.lobes[1][0]) + rng.normal(0, 10, 3)
        dist = (x - p[0]) * n[0] + (y - p[1]) * n[1] + (z - p[2]) * n[2]
        cleft = (np.abs(dist) < float(rng.uniform(1.5, 3.0))) & (_ellipsoid(x, y, z, p, (60, 60, 40)) < 1) & liver
        region_ct[cleft] = body.visceral
        region_lab[cleft] = 0
    # gallbladder in its fossa on the liver's underside: bile, a thin wall; not liver
    if rng.random() < 0.8:
        gb_c = (right_c[0] + float(rng.uniform(15, 35)), right_c[1] - float(rng.uniform(10, 30)),
                shape.bottom + float(rng.uniform(25, 50)))
        gb_r = (float(rng.uniform(12, 20)), float(rng.uniform(12, 20)), float(rng.uniform(25, 40)))
        e = _ellipsoid(x, y, z, gb_c, gb_r)
        gb = (e < 1) & cavity[box]
        region_ct[gb] = contrast.bowel_wall
        region_ct[(e < 0.75) & cavity[box]] = float(rng.uniform(0, 22))
        region_lab[gb] = 0
        liver &= ~gb
    # tumors: centres drawn among liver voxels, kept away from each other
    tumors: list[Tumor] = []
    n_tumors = int(rng.choice([0, 1, 1, 2, 2, 3, 3, 4]))
    idx = np.argwhere(region_lab == LIVER)
    base_field = region_ct.copy()
    for _ in range(n_tumors):
        if len(idx) == 0:
            break
        cen = None
        for _try in range(20):
            iz, iy, ix = idx[rng.integers(len(idx))]
            cand = (float(x[0, 0, ix]), float(y[0, iy, 0]), float(z[iz, 0, 0]))
            if all(np.linalg.norm(np.subtract(cand, t.center_mm)) > (t.diameter_mm / 2 + 25) for t in tumors):
                cen = cand
                break
        if cen is None:
            break
        diam = float(rng.uniform(5, 42))
        kind = rng.random()
        if kind < 0.7:
            delta = -float(rng.uniform(20, 60))  # hypodense metastasis
        elif kind < 0.85:
            delta = float(rng.uniform(15, 45)) if contrast.phase == "arterial" else -float(rng.uniform(15, 35))
        else:
            delta = float(np.clip(rng.uniform(0, 15) - base, -90, -15))  # cyst-like, near water
        radii = np.array([diam / 2] * 3) * rng.uniform(0.85, 1.15, 3)
        scale = radii / (diam / 2)
        rad_field = np.sqrt(((x - cen[0]) / scale[0]) ** 2 + ((y - cen[1]) / scale[1]) ** 2 + ((z - cen[2]) / scale[2]) ** 2)
        inside = (rad_field < diam / 2) & (region_lab > 0)
        if not inside.any():
            continue
        tumors.append(Tumor((round(cen[0], 2), round(cen[1], 2), round(cen[2], 2)), round(diam, 2), round(delta, 1)))
        edge = np.clip((diam / 2 - rad_field) / 1.5, 0, 1)
        noise = 1.0 + 0.15 * rng.standard_normal(edge.shape).astype(np.float32)
        hu_t = base_field + delta * edge * noise
        if rng.random() < 0.15 and contrast.phase != "none":  # an enhancing rim
            hu_t = hu_t + 25.0 * ((rad_field > diam / 2 - 2.5) & (rad_field < diam / 2))
        region_ct[inside] = hu_t[inside]
        region_lab[inside] = TUMOR
    ct[box] = region_ct
    labels[box] = region_lab
    return tumors


# ------------------------------------------------------------------------------------------------ scanner


def _acquire(seed: int, grid: _Grid, ct: np.ndarray, cavity: np.ndarray) -> np.ndarray:
    """What the scanner adds: partial volume (in-plane PSF, slice profile), streaks, correlated noise -> int16."""
    rng = _rng(seed, "scanner")
    thickness, pixel = grid.spacing[0], grid.spacing[1]
    psf_mm = float(rng.uniform(0.5, 1.1))
    sigma = (float(rng.uniform(0.25, 0.45)), psf_mm / pixel, psf_mm / pixel)
    ndimage.gaussian_filter(ct, sigma=sigma, output=ct, mode="nearest", truncate=2.5)
    # beam-hardening streaks: dark/bright lines through dense structures on some slices
    if rng.random() < 0.35:
        xx = grid.x.astype(np.float32)[None, :]
        yy = grid.y.astype(np.float32)[:, None]
        band = rng.uniform(grid.z[0], grid.z[-1])
        for k in np.flatnonzero(np.abs(grid.z - band) < rng.uniform(10, 60)):
            sl = ct[k]
            for _ in range(int(rng.integers(2, 6))):
                ang = rng.uniform(0, np.pi)
                off = rng.uniform(-60, 60)
                dist = xx * np.sin(ang) - yy * np.cos(ang) - off
                amp = float(rng.uniform(30, 110)) * rng.choice([-1.0, 1.0])
                streak = amp * np.exp(-(dist**2) / (2 * rng.uniform(0.8, 2.5) ** 2))
                sl += np.where(sl > -500, streak, 0).astype(np.float32)
    # quantum noise: correlated (blotchy) like filtered back-projection, stronger for thin slices and low dose
    noise_sd = float(rng.uniform(7, 22)) * np.sqrt(2.5 / thickness) ** 0.5 * (1.6 if rng.random() < 0.15 else 1.0)
    corr = float(rng.uniform(0.5, 1.4)) / max(pixel, 0.5)
    gain = np.float32(noise_sd * corr * 2 * np.sqrt(np.pi))  # keeps the filtered noise's SD near noise_sd
    noise_rng = np.random.default_rng([seed, 1_000_003])
    out = np.empty(grid.shape, np.int16)
    for k in range(grid.shape[0]):
        n = noise_rng.standard_normal((ROWS, COLS), dtype=np.float32)
        n = ndimage.gaussian_filter(n, corr, mode="wrap") * gain
        out[k] = np.clip(np.rint(ct[k] + n), -1024, 3071).astype(np.int16)
    return out


def noise_volume(seed: int, shape: tuple[int, int, int] = (60, 256, 256), spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)
                 ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A volume of pure random values over the CT range: no anatomy at all (a hard negative)."""
    rng = np.random.default_rng([seed, 77])
    return rng.integers(-1024, 1500, size=shape, dtype=np.int16), spacing
