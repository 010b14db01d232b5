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
