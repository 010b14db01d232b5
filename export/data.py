"""Training data: phantoms run through the served preprocessing (the DALI pipeline on the CPU).

Only phantoms this project generates are training data. Real CT (TotalSegmentator's reference files under
``.cache/realct``, ``make realct``) is for development and acceptance: **never training data**; the loader
below refuses any case that is not a phantom.

Labels go to the model grid by nearest-neighbour sampling at the centres of the model voxels, the same grid
convention as the preprocessing. Results are cached under ``.cache/train`` by seed, region and the recipe's hash
(``recipe_key``: the generator's, the preprocessing's and the label sampling's code and the spec's grid and window),
so a change to any of them makes new cases instead of reusing stale ones.
"""

from __future__ import annotations

import functools
import hashlib
import inspect

import numpy as np
from tqdm import tqdm

from export.augment import MIN_CUT_SLICES, liver_slices
from medseg.ops import dali_pipeline, preprocess
from medseg.ops.preprocess import source_coordinates
from medseg.paths import REPO_ROOT
from medseg.synth import phantom
from medseg.synth.phantom import GENERATOR_VERSION, REGIONS, generate
from medseg_client.spec import SPEC

CACHE = REPO_ROOT / ".cache" / "train"
PHANTOM_RECIPE = f"medseg.phantom.generate(seed, region) v{GENERATOR_VERSION}"

# the training mix: most scans hold the liver; a fifth are hard negatives (other body regions, no liver) so the
# network learns what is not liver (heart, spleen, brain, bladder, muscle) and what a cut-off liver looks like
TRAIN_MIX = {"abdomen": 26, "chest_abdomen": 6, "abdomen_pelvis": 4, "liver_tip": 2, "chest": 3, "head": 2, "neck": 1,
             "pelvis": 2, "legs": 1, "no_liver": 1}
VAL_CASES = [(2000, "abdomen"), (2001, "abdomen"), (2002, "chest_abdomen"), (2003, "chest"), (2004, "head")]


def train_cases(first_seed: int = 1000) -> list[tuple[int, str]]:
    """(seed, region) of every training phantom: the regions of TRAIN_MIX in a fixed interleaved order."""
    regions = [r for r, n in TRAIN_MIX.items() for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(regions))
    return [(first_seed + i, regions[int(j)]) for i, j in enumerate(order)]


def labels_to_model_grid(labels: np.ndarray, spacing: tuple[float, ...], grid: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour labels at the centres of the model grid's voxels."""
    out = labels
    for axis in range(3):
        coords = source_coordinates(grid[axis], SPEC.model_spacing[axis] / spacing[axis], labels.shape[axis])
        out = np.take(out, np.floor(coords + 0.5).astype(np.int64), axis=axis)
    return out


@functools.cache
def recipe_key() -> str:
    """A short hash of what makes a cached training case: the phantom generator's code, the preprocessing's (the DALI
    graph and its numpy statement of the grid), the label sampling's, and the spec's grid, window and padding."""
    h = hashlib.sha256()
    for source in (inspect.getsource(phantom), inspect.getsource(dali_pipeline), inspect.getsource(preprocess),
                   inspect.getsource(labels_to_model_grid)):
        h.update(source.encode())
    h.update(repr((SPEC.model_spacing, SPEC.hu_window, SPEC.network.size_divisor, preprocess.PAD_VALUE)).encode())
    return h.hexdigest()[:12]


def training_case(seed: int, region: str, preprocessor) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(image (1, Z, Y, X) float32 unpadded, labels (1, Z, Y, X) uint8) of one phantom, cached."""
    if region not in REGIONS:
        raise ValueError(f"training cases are phantoms of a region in {REGIONS}, got {region!r}")
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{recipe_key()}-seed{seed}-{region}.npz"
    if path.exists():
        with np.load(path) as d:
            return d["image"], d["labels"]
    ph = generate(seed, region=region)
    image, grid = preprocessor(ph.ct, np.asarray(ph.spacing, np.float32))
    image = image[:, : grid[0], : grid[1], : grid[2]]
    labels = labels_to_model_grid(ph.labels, ph.spacing, grid)[None]
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, image=image, labels=labels)
    tmp.rename(path)
    return image, labels


def scan_end_cases(cases: list[tuple[np.ndarray, np.ndarray]], kept: float = 0.7) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each case holding a liver, twice more: its scan stopped inside the liver so that ``kept`` of the liver's
    z extent remains, once at each end (what real abdominal and chest scans do); for validation as served."""
    out = []
    for image, labels in cases:
        slices = liver_slices(labels)
        if len(slices) < MIN_CUT_SLICES:
            continue
        extent = slices[-1] + 1 - slices[0]
        top, bottom = slices[0] + round((1 - kept) * extent), slices[0] + round(kept * extent)
        out += [(image[:, top:], labels[:, top:]), (image[:, :bottom], labels[:, :bottom])]
    return out


def load_cases(cases: list[tuple[int, str]], desc: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Build (or read from the cache) the phantoms of ``cases`` (seed, region) with a progress bar."""
    from medseg.ops.dali_pipeline import CpuPreprocessor

    pre = CpuPreprocessor()
    return [training_case(s, r, pre) for s, r in tqdm(cases, desc=desc, unit="study")]
