"""The PyTorch math for GPU flavors agrees with the numpy reference and DALI: on torch's CPU device
everywhere, and on the GPU too where there is one (gpu-marked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.ops import torch_ops
from medseg.ops.postprocess import to_input_grid
from medseg.ops.preprocess import preprocess_reference
from tests.helpers import CUDA_REASON, cuda_available


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


@pytest.fixture(scope="module")
def phantom_case() -> tuple[np.ndarray, tuple[int, int, int], np.ndarray, tuple[float, float, float]]:
    """Noisy logits whose argmax is a phantom's truth plus speckle and a detached blob, and the phantom's CT."""
    from export.data import labels_to_model_grid
    from medseg.synth.phantom import generate
    from medseg_client.spec import model_grid_shape, padded_shape

    ph = generate(5101, num_slices=40, slice_thickness=5.0)
    grid = model_grid_shape(ph.ct.shape, ph.spacing)
    truth = labels_to_model_grid(ph.labels, ph.spacing, grid).astype(np.int64)
    rng = np.random.default_rng(0)
    truth[rng.random(grid) < 0.002] = 2
    truth[2:5, 5:9, 5:9] = 1  # a detached blob the judging must drop
    logits = rng.normal(0, 0.3, size=(3, *padded_shape(grid))).astype(np.float32)
    for c in range(3):
        logits[c, : grid[0], : grid[1], : grid[2]] += 4.0 * (truth == c)
    return logits, grid, ph.ct, ph.spacing


def test_torch_postprocessing_equals_numpys_voxel_for_voxel(phantom_case, device: str) -> None:  # type: ignore[no-untyped-def]
    from medseg.ops.postprocess import findings, head, postprocess

    logits, grid, ct, spacing = phantom_case
    labels, probabilities = head(logits)
    want, want_doc = postprocess(labels, probabilities, grid, ct, spacing)
    volume = torch_ops.DeviceVolume(torch.from_numpy(ct).to(device))
    got, verdict = torch_ops.postprocess(torch.from_numpy(labels).to(device), torch.from_numpy(probabilities).to(device),
                                         grid, volume, spacing)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert want_doc["status"]["code"] == "ok" and (want == 2).any() and (want == 1).any()
    assert findings(got, grid, volume, spacing, verdict) == want_doc  # the CT read in boxes on the device


def test_a_ct_on_the_device_is_read_as_numpy_reads_it(device: str) -> None:
    ct = np.random.default_rng(5).integers(-1000, 1000, size=(12, 20, 24)).astype(np.int16)
    volume = torch_ops.DeviceVolume(torch.from_numpy(ct).to(device))
    box = (slice(2, 9), slice(0, 20), slice(5, 6))
    assert volume.shape == ct.shape and np.array_equal(volume[box], ct[box])
    index = [np.array([0, 3, 3, 11]), np.array([19, 2]), np.arange(0, 24, 5)]
    assert np.array_equal(volume.gather(index), ct[np.ix_(*index)])


def test_torch_probabilities_in_a_box_equal_numpys(device: str) -> None:
    from medseg.ops.postprocess import head, probabilities_box

    _, probabilities = head(np.random.default_rng(2).normal(0, 3, size=(3, 10, 12, 14)).astype(np.float32))
    box = (slice(2, 8), slice(1, 11), slice(3, 9))
    got = torch_ops.probabilities_box(torch.from_numpy(probabilities).to(device), box)
    for g, w in zip(got, probabilities_box(probabilities, box), strict=True):
        assert g.dtype == np.float32 and np.array_equal(g, w)


def test_torch_postprocessing_refuses_segmenter_outputs_of_the_wrong_shape() -> None:
    volume = torch_ops.DeviceVolume(torch.zeros(4, 4, 4, dtype=torch.int16))
    with pytest.raises(ValueError, match="probabilities"):
        torch_ops.postprocess(torch.zeros(4, 4, 4), torch.zeros(3, 4, 4, 4), (4, 4, 4), volume, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="exceeds"):
        torch_ops.postprocess(torch.zeros(4, 4, 4), torch.zeros(2, 4, 4, 4), (8, 4, 4), volume, (1.0, 1.0, 1.0))
