"""Preprocessing: the HU window, the centred model grid, and DALI agreeing with the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.ops.preprocess import preprocess_reference, source_coordinates, target_indices, window
from medseg_client.spec import SPEC
from tests.helpers import cuda_available


def test_window_maps_its_bounds_to_0_and_1_and_clips_outside() -> None:
    lo, hi = SPEC.hu_window
    hu = np.array([-1024, lo, (lo + hi) / 2, hi, 3000], np.float32)
    np.testing.assert_allclose(window(hu), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_model_grid_is_centred_on_the_study() -> None:
    # 40 voxels of 0.7 mm -> 19 voxels of 1.5 mm (28.5 mm) centred on the 28 mm extent
    coords = source_coordinates(19, 1.5 / 0.7, 40)
    centre_in = (40 - 1) / 2
    assert abs((coords[0] + coords[-1]) / 2 - centre_in) < 1e-9


def test_nearest_mapping_back_inverts_the_forward_grid() -> None:
    scale = 1.5 / 0.7
    idx = target_indices(40, scale, 19)
    centres = source_coordinates(19, scale, 40)
    # every model voxel's centre lands in a study voxel that maps back to it
    for j, c in enumerate(centres):
        assert idx[round(c)] == j


@pytest.mark.parametrize(("shape", "spacing"), [((24, 64, 60), (2.5, 0.7, 0.8)), ((9, 40, 50), (5.0, 3.0, 0.5))])
def test_dali_pipeline_matches_the_numpy_reference(shape: tuple[int, int, int], spacing: tuple[float, ...]) -> None:
    from medseg.ops.dali_pipeline import CpuPreprocessor

    rng = np.random.default_rng(0)
    ct = rng.normal(0, 300, size=shape).astype(np.int16)
    image, grid = CpuPreprocessor(num_threads=1)(ct, np.asarray(spacing, np.float32))
    ref, ref_grid = preprocess_reference(ct, spacing)
    assert grid == ref_grid
    assert image.shape == ref.shape
    assert all(n % SPEC.network.size_divisor == 0 for n in image.shape[1:])
    np.testing.assert_allclose(image, ref, atol=2e-4)


def _load_dali_model() -> object:
    import importlib.util

    from medseg.paths import MODEL_REPOSITORY

    path = MODEL_REPOSITORY / SPEC.preprocess.name / str(SPEC.preprocess.version) / "dali.py"
    spec = importlib.util.spec_from_file_location("medseg_dali_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dali_backend_finds_exactly_one_autoserializable_pipeline() -> None:
    from nvidia.dali._utils.autoserialize import _discover_autoserialize

    found = _discover_autoserialize(_load_dali_model(), visited=[])
    assert len(found) == 1 and getattr(found[0], "_is_pipeline_def", False)


def test_the_shared_graph_serializes_with_inputs_named_as_in_the_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from medseg.ops.dali_pipeline import ct_preprocess

    pipe = ct_preprocess(device="cpu", batch_size=SPEC.max_batch_size, num_threads=1, device_id=None)
    blob = pipe.serialize()
    for t in SPEC.preprocess.inputs:
        assert t.name.encode() in blob


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="serializing the GPU DALI pipeline needs CUDA and an NVIDIA GPU")
def test_the_gpu_pipeline_autoserializes_as_the_dali_backend_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nvidia.dali._utils.autoserialize import invoke_autoserialize

    invoke_autoserialize(_load_dali_model(), str(tmp_path / "model.dali"))
    assert (tmp_path / "model.dali").stat().st_size > 0
