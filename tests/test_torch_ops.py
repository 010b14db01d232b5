"""The PyTorch math for GPU flavors agrees with the numpy reference and DALI: on torch's CPU device
everywhere, and on the GPU too where there is one (gpu-marked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg import torch_ops
from medseg.postprocess import to_input_grid
from medseg.preprocess import preprocess_reference
from tests.conftest import CUDA_REASON, cuda_available


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason=CUDA_REASON)])])
def device(request: pytest.FixtureRequest) -> str:
    """Where the torch math runs: torch's CPU device, and the GPU where there is one."""
    return str(request.param)


@pytest.mark.parametrize(("shape", "spacing"), [((24, 64, 60), (2.5, 0.7, 0.8)), ((9, 40, 50), (5.0, 3.0, 0.5))])
def test_torch_preprocessing_equals_the_numpy_reference(shape: tuple[int, int, int], spacing: tuple[float, ...],
                                                       device: str) -> None:
    ct = np.random.default_rng(0).normal(0, 300, size=shape).astype(np.int16)
    image, grid = torch_ops.preprocess(torch.from_numpy(ct).to(device), spacing)
    ref, ref_grid = preprocess_reference(ct, spacing)
    assert grid == ref_grid and image.device.type == device
    np.testing.assert_allclose(image.cpu().numpy(), ref, atol=1e-5)


def test_torch_labels_back_on_the_input_grid_equal_numpys(device: str) -> None:
    labels = np.random.default_rng(1).integers(0, 3, size=(20, 30, 30)).astype(np.uint8)
    shape, spacing = (40, 64, 60), (1.0, 0.7, 0.75)
    got = torch_ops.to_input_grid(torch.from_numpy(labels).to(device), shape, spacing).cpu().numpy()
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
def test_torch_postprocessing_equals_numpys_voxel_for_voxel(seed: int, device: str) -> None:
    from medseg.postprocess import keep_liver_and_its_tumors, logits_to_labels

    logits, grid = _organ_logits(seed), (22, 40, 36)
    shape, spacing = (30, 70, 64), (1.4, 0.8, 0.85)
    want = to_input_grid(keep_liver_and_its_tumors(logits_to_labels(logits, grid)), shape, spacing)
    got = torch_ops.labels_on_input_grid(torch.from_numpy(logits).to(device), grid, shape, spacing)
    assert got.dtype == torch.uint8 and got.device.type == device
    assert np.array_equal(got.cpu().numpy(), want)
    assert (want == 2).any() and (want == 1).any(), "the case must keep an organ with a tumor"


def test_torch_postprocessing_of_an_empty_prediction_is_all_background(device: str) -> None:
    logits = np.zeros((3, 8, 16, 16), np.float32)
    logits[0] = 1.0
    got = torch_ops.labels_on_input_grid(torch.from_numpy(logits).to(device), (8, 16, 16), (8, 16, 16), (2.0, 1.5, 1.5))
    assert not got.any()


def test_torch_postprocessing_refuses_logits_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="classes=3"):
        torch_ops.logits_to_labels(torch.zeros(2, 4, 4, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="exceeds"):
        torch_ops.logits_to_labels(torch.zeros(3, 4, 4, 4), (8, 4, 4))


@pytest.mark.parametrize("seed", [3, 4])
def test_components_by_propagation_number_them_as_scipy_does(seed: int, device: str) -> None:
    from scipy import ndimage

    from medseg.torch_ops import _components_on_device

    mask = np.random.default_rng(seed).random((18, 30, 26)) < 0.08  # many components, touching by corners too
    want, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    got = _components_on_device(torch.from_numpy(mask).to(device))
    assert got is not None and n > 20
    ids = np.unique(got.cpu().numpy()[mask])  # ascending = raster order of each component's first voxel
    renumbered = np.zeros_like(want)
    renumbered[mask] = np.searchsorted(ids, got.cpu().numpy()[mask]) + 1
    assert np.array_equal(renumbered, want)


def test_a_mask_too_long_to_settle_on_the_device_is_finished_on_the_host(device: str) -> None:
    from medseg.torch_ops import _components, _components_on_device

    snake = np.zeros((3, 9, 40), bool)  # one component whose path is ~200 voxels long
    snake[1, ::2, :] = True
    snake[1, 1::4, -1] = True
    snake[1, 3::4, 0] = True
    assert _components_on_device(torch.from_numpy(snake).to(device), max_passes=32) is None
    comp = _components(torch.from_numpy(snake).to(device))
    assert comp.device.type == device and set(np.unique(comp.cpu().numpy())) == {0, 1}


def test_a_tie_between_organs_keeps_the_one_met_first_as_numpy_does(device: str) -> None:
    from medseg.postprocess import keep_liver_and_its_tumors

    labels = np.zeros((6, 12, 12), np.uint8)
    labels[1:3, 1:4, 1:4] = 1
    labels[3:5, 8:11, 8:11] = 2  # the same size, later in raster order
    got = torch_ops.keep_liver_and_its_tumors(torch.from_numpy(labels).to(device)).cpu().numpy()
    assert np.array_equal(got, keep_liver_and_its_tumors(labels)) and got[1, 1, 1] == 1 and not got[4, 9, 9]
