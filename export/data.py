"""Training data: phantoms run through the served preprocessing (the DALI pipeline on the CPU).

Labels go to the model grid by nearest-neighbour sampling at the centres of the model voxels, the
same grid convention as the preprocessing. Results are cached under ``.cache/`` by seed.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from medseg.phantom import generate
from medseg.preprocess import source_coordinates
from medseg.spec import REPO_ROOT, SPEC

CACHE = REPO_ROOT / ".cache" / "train"
PHANTOM_RECIPE = "medseg.phantom.generate(seed) v1"


def labels_to_model_grid(labels: np.ndarray, spacing: tuple[float, ...], grid: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour labels at the centres of the model grid's voxels."""
    out = labels
    for axis in range(3):
        coords = source_coordinates(grid[axis], SPEC.model_spacing[axis] / spacing[axis], labels.shape[axis])
        out = np.take(out, np.floor(coords + 0.5).astype(np.int64), axis=axis)
    return out


def training_case(seed: int, preprocessor) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(image (1, Z, Y, X) float32 unpadded, labels (1, Z, Y, X) uint8) of one phantom, cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"seed{seed}.npz"
    if path.exists():
        with np.load(path) as d:
            return d["image"], d["labels"]
    ph = generate(seed)
    image, grid = preprocessor(ph.ct, np.asarray(ph.spacing, np.float32))
    image = image[:, : grid[0], : grid[1], : grid[2]]
    labels = labels_to_model_grid(ph.labels, ph.spacing, grid)[None]
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, image=image, labels=labels)
    tmp.rename(path)
    return image, labels


def load_cases(seeds: list[int], desc: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Build (or read from the cache) the cases of ``seeds`` with a progress bar."""
    from medseg.dali_pipeline import CpuPreprocessor

    pre = CpuPreprocessor()
    return [training_case(s, pre) for s in tqdm(seeds, desc=desc, unit="study")]

