"""Tiled inference equals whole-volume inference; bad studies are refused with a reason."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.model.inference import run_tiled, z_tiles
from medseg_client.errors import StudyError
from medseg_client.spec import SPEC
from medseg_client.validate import check_study


@pytest.mark.parametrize("depth", [16, 64, 160, 512])
def test_z_tiles_keep_every_slice_exactly_once(depth: int) -> None:
    tiles = z_tiles(depth, 256 * 256, 48 * 256 * 256, SPEC.tile_overlap, SPEC.network.size_divisor)
    kept = np.zeros(depth, int)
    for start, stop, k0, k1 in tiles:
        assert 0 <= start <= k0 < k1 <= stop <= depth
        kept[k0:k1] += 1
    assert (kept == 1).all()


@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_tiled_run_equals_a_whole_run_for_a_local_operator(array: str) -> None:
    def runner(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # a local (3-slice) operator, like a shallow convnet
        assert batch.flags.c_contiguous
        x = batch[:, 0]
        smooth = (np.roll(x, 1, 1) + x + np.roll(x, -1, 1)) / 3
        smooth[:, 0], smooth[:, -1] = x[:, 0], x[:, -1]
        # two outputs as the segmenter's head gives them: (B, Z, Y, X) uint8 and (B, 2, Z, Y, X) float16
        return (smooth > 0.5).astype(np.uint8), np.stack([smooth, x], 1).astype(np.float16)

    rng = np.random.default_rng(1)
    image = rng.random((1, 160, 16, 16)).astype(np.float32)
    if array == "torch":  # the GPU flavors tile torch tensors on their device
        import torch

        def torch_runner(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
            assert batch.is_contiguous()
            return tuple(torch.from_numpy(o) for o in runner(batch.numpy()))

        whole = [o.numpy() for o in run_tiled(torch_runner, torch.from_numpy(image), tile_voxels=10**9)]
        tiled = [o.numpy() for o in run_tiled(torch_runner, torch.from_numpy(image), tile_voxels=48 * 16 * 16)]
    else:
        whole = list(run_tiled(runner, image, tile_voxels=10**9))
        tiled = list(run_tiled(runner, image, tile_voxels=48 * 16 * 16))
    assert [o.shape for o in tiled] == [(160, 16, 16), (2, 160, 16, 16)]
    assert [o.dtype for o in tiled] == [np.uint8, np.float16]
    assert (whole[0] == 1).any() and (whole[0] == 0).any()
    for t, w in zip(tiled, whole, strict=True):
        np.testing.assert_array_equal(t, w)


@pytest.mark.parametrize(
    ("shape", "dtype", "spacing", "message"),
    [
        ((80, 512, 512), np.float32, (2, 0.7, 0.7), "int16"),
        ((512, 512), np.int16, (2, 0.7, 0.7), "3-D"),
        ((80, 512, 512), np.int16, (0, 0.7, 0.7), "spacing along z"),
        ((80, 512, 512), np.int16, (2, math.nan, 0.7), "spacing along y"),
        ((80, 512, 512), np.int16, (2, 0.7, math.inf), "spacing along x"),
        ((80, 512, 512), np.int16, (-2, 0.7, 0.7), "spacing along z"),
        ((80, 512, 512), np.int16, (2, 0.7), "3 values"),
        ((80, 4, 512), np.int16, (2, 0.7, 0.7), "size along y"),
        ((3000, 512, 512), np.int16, (2, 0.7, 0.7), "size along z"),
        ((1300, 512, 512), np.int16, (1, 0.7, 0.7), "voxels"),
        ((400, 512, 512), np.int16, (5, 0.7, 0.7), "extent along z"),
    ],
)
def test_bad_studies_are_refused_with_the_reason(shape, dtype, spacing, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StudyError, match=message):
        check_study(shape, np.dtype(dtype), spacing)


def test_a_study_up_to_512x512x1000_is_accepted() -> None:
    assert check_study((1000, 512, 512), np.dtype(np.int16), (1.0, 0.8, 0.8)) == (500, 273, 273)


def test_the_reference_pipeline_with_numpy_preprocessing_agrees_with_dali() -> None:
    """Where DALI is missing (a GPU host with only PyTorch) the reference preprocesses in numpy: same labels."""
    from medseg.accuracy.metrics import AGREEMENT_DICE, dice
    from medseg.model.pipeline import ReferencePipeline, dali_installed
    from medseg.synth.phantom import generate

    if not dali_installed():
        pytest.skip("NVIDIA DALI not installed: nothing to compare the numpy preprocessing with")
    ph = generate(5003, num_slices=40, slice_thickness=5.0)
    (numpy_labels, _), (dali_labels, _) = (ReferencePipeline(preprocessing=p)(ph.ct, ph.spacing)
                                                   for p in ("numpy", "dali"))
    assert (dali_labels == 1).any()
    for lab in SPEC.labels[1:]:
        if (dali_labels == lab.value).any():
            assert dice(numpy_labels == lab.value, dali_labels == lab.value) >= AGREEMENT_DICE, lab.name
    with pytest.raises(ValueError, match="preprocessing must be 'dali' or 'numpy', got 'cuda'"):
        ReferencePipeline(preprocessing="cuda")
