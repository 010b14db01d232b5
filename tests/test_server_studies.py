"""Server tier, clinical DICOM: however a series is stored, the labels land on the right grid.

Shuffled file names, a second series in the folder, compressed pixel data, flipped storage, a
sagittal re-stack and a gantry-tilted acquisition of the same anatomy all segment through
`medseg segment`; the labels, read back through their file's affine, match the ground truth
(Dice at least the model's floor on unseen phantoms) and the SEG passes dciodvfy.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from medseg.accuracy.metrics import dice
from medseg.synth.phantom import generate
from medseg_client.io.studies import read_study
from tests.helpers import LIVER_DICE_FLOOR, dciodvfy_errors, needs_dciodvfy
from tests.series_variants import tilt_rows, write_variant

pytestmark = pytest.mark.server
SEED = 5006  # never used in training


@pytest.fixture(scope="module")
def phantom() -> Any:
    return generate(SEED, num_slices=80, slice_thickness=4.0)


def _prepare(ph: Any, root: Path, variant: str) -> Path:
    folder = root / "series"
    if variant in ("axial", "flipped", "sagittal", "tilted", "oblique"):
        write_variant(ph, folder, variant)
    elif variant == "shuffled":
        write_variant(ph, folder, "axial")
        files = sorted(folder.iterdir())
        for f, new in zip(files, np.random.default_rng(0).permutation(len(files)), strict=True):
            f.rename(folder / f"z{new:05d}")
    elif variant == "two_series":
        write_variant(ph, folder, "axial")
        write_variant(generate(SEED + 100, num_slices=60, slice_thickness=4.0), root / "other", "axial")
        for f in (root / "other").iterdir():
            f.rename(folder / f"other_{f.name}")
    elif variant == "jpeg_ls":
        write_variant(ph, folder, "axial")
        for f in folder.iterdir():
            ds = pydicom.dcmread(f)
            ds.compress(pydicom.uid.JPEGLSLossless)
            ds.save_as(f)
    return folder


VARIANTS = ["axial", "shuffled", "two_series", "jpeg_ls", "flipped", "sagittal", "tilted", "oblique"]


@pytest.fixture(scope="module")
def segmented(phantom: Any, server: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``medseg segment`` on the phantom stored as ``variant``, run once per variant: its output folder."""
    outs: dict[str, Path] = {}

    def run(variant: str) -> Path:
        if variant not in outs:
            tmp_path = tmp_path_factory.mktemp(variant)
            series = _prepare(phantom, tmp_path, variant)
            r = subprocess.run([sys.executable, "-m", "medseg_client.cli", "segment", "--url", server.grpc_url,
                                str(series), "--out", str(tmp_path / "result")], capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, r.stderr
            outs[variant] = tmp_path / "result"
        return outs[variant]

    return run


@pytest.mark.parametrize("variant", VARIANTS)
def test_any_storage_of_a_series_segments_onto_the_right_grid(variant: str, phantom: Any,
                                                              segmented: Callable[[str], Path]) -> None:
    out = segmented(variant)
    predicted = read_study(out / "labels.nii.gz")  # back on the canonical grid, through the file's affine
    assert predicted.ct.shape == phantom.ct.shape
    np.testing.assert_allclose(predicted.lps_mm([0, 0, 0]), phantom.origin_mm, atol=1e-2)
    truth = tilt_rows(phantom.labels, 0) if variant == "tilted" else phantom.labels  # on the acquired slices
    assert dice(predicted.ct > 0, truth > 0) >= LIVER_DICE_FLOOR


@needs_dciodvfy
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_seg_of_any_storage_passes_dciodvfy(variant: str, segmented: Callable[[str], Path]) -> None:
    assert dciodvfy_errors(segmented(variant) / "seg.dcm") == []
