"""The PyTorch math for GPU flavors agrees with the numpy reference and DALI (run here on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg import torch_ops
from medseg.postprocess import to_input_grid
from medseg.preprocess import preprocess_reference


@pytest.mark.parametrize(("shape", "spacing"), [((24, 64, 60), (2.5, 0.7, 0.8)), ((9, 40, 50), (5.0, 3.0, 0.5))])
def test_torch_preprocessing_equals_the_numpy_reference(shape: tuple[int, int, int], spacing: tuple[float, ...]) -> None:
    ct = np.random.default_rng(0).normal(0, 300, size=shape).astype(np.int16)
    image, grid = torch_ops.preprocess(torch.from_numpy(ct), spacing)
    ref, ref_grid = preprocess_reference(ct, spacing)
    assert grid == ref_grid
    np.testing.assert_allclose(image.numpy(), ref, atol=1e-5)


def test_torch_labels_back_on_the_input_grid_equal_numpys() -> None:
    labels = np.random.default_rng(1).integers(0, 3, size=(20, 30, 30)).astype(np.uint8)
    shape, spacing = (40, 64, 60), (1.0, 0.7, 0.75)
    got = torch_ops.to_input_grid(torch.from_numpy(labels), shape, spacing).numpy()
    assert np.array_equal(got, to_input_grid(labels, shape, spacing))


def _organ_logits(seed: int, shape: tuple[int, int, int] = (22, 40, 36)) -> np.ndarray:
    """Logits whose argmax is a big organ with tumors, a detached blob and speckle: what CC must clean up."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    organ = ((z - 10) / 8.0) ** 2 + ((y - 18) / 12.0) ** 2 + ((x - 16) / 11.0) ** 2 < 1
    tumor = ((z - 10) / 3.0) ** 2 + ((y - 16) / 3.0) ** 2 + ((x - 14) / 3.0) ** 2 < 1
    blob = ((z - 18) / 2.0) ** 2 + ((y - 35) / 3.0) ** 2 + ((x - 32) / 2.0) ** 2 < 1
    truth = np.where(organ | blob, 1, 0) + tumor
    truth[rng.random(shape) < 0.002] = 2
    logits = rng.normal(0, 0.1, size=(3, *shape)).astype(np.float32)
    for c in range(3):
        logits[c] += 3.0 * (truth == c)
    return np.pad(logits, ((0, 0), (0, 2), (0, 8), (0, 12)))  # the padding the network sees


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_postprocessing_equals_numpys_voxel_for_voxel(seed: int) -> None:
    from medseg.postprocess import keep_liver_and_its_tumors, logits_to_labels

    logits, grid = _organ_logits(seed), (22, 40, 36)
    shape, spacing = (30, 70, 64), (1.4, 0.8, 0.85)
    want = to_input_grid(keep_liver_and_its_tumors(logits_to_labels(logits, grid)), shape, spacing)
    got = torch_ops.labels_on_input_grid(torch.from_numpy(logits), grid, shape, spacing)
    assert got.dtype == torch.uint8
    assert np.array_equal(got.numpy(), want)
    assert (want == 2).any() and (want == 1).any(), "the case must keep an organ with a tumor"


def test_torch_postprocessing_of_an_empty_prediction_is_all_background() -> None:
    logits = np.zeros((3, 8, 16, 16), np.float32)
    logits[0] = 1.0
    got = torch_ops.labels_on_input_grid(torch.from_numpy(logits), (8, 16, 16), (8, 16, 16), (2.0, 1.5, 1.5))
    assert not got.any()


def test_torch_postprocessing_refuses_logits_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="classes=3"):
        torch_ops.logits_to_labels(torch.zeros(2, 4, 4, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="exceeds"):
        torch_ops.logits_to_labels(torch.zeros(3, 4, 4, 4), (8, 4, 4))
