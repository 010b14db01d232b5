"""medseg.ops.nnunet against nnU-Net v2's own functions (the installed nnunetv2 is the oracle): resampling in
both directions, isotropic and anisotropic (the coarse axis apart), crop, window positions, Gaussian weights,
and the whole sliding window with mirroring against nnUNetPredictor on a small random network."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medseg.ops import nnunet as ops

GEOMETRIES = [
    ((20, 30, 28), (1.0, 1.0, 1.0), (1.5, 0.8, 1.2)),  # isotropic source: one 3-D spline pass
    ((12, 40, 36), (5.0, 0.8, 0.8), (3.0, 1.5, 1.5)),  # thick slices: in-plane splines, nearest along z
    ((30, 25, 25), (1.5, 1.5, 1.5), (5.0, 1.0, 1.0)),  # anisotropic target decides
    ((25, 14, 30), (0.8, 4.0, 0.9), (1.0, 3.0, 1.0)),  # the coarse axis need not be z
    ((10, 20, 20), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0)),  # same grid: untouched
]


@pytest.mark.parametrize(("shape", "spacing", "target"), GEOMETRIES)
@pytest.mark.parametrize("order", [3, 1])
def test_resampling_is_nnunets(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...],
                               order: int) -> None:
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape

    x = np.random.default_rng(order).normal(size=(2, *shape)).astype(np.float32) * 300
    new = ops.resampled_shape(shape, spacing, target)
    assert new == tuple(compute_new_shape(shape, spacing, target))
    ref = resample_data_or_seg_to_shape(x, new, spacing, target, is_seg=False, order=order, order_z=0, force_separate_z=None)
    got = ops.resample(x, new, spacing, target, order, 0, ops.separate_axis(spacing, target))
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)


def test_crop_is_nnunets() -> None:
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    x = np.zeros((1, 20, 30, 30), np.float32)
    x[0, 3:15, 5:20, 2:29] = np.random.default_rng(0).normal(size=(12, 15, 27)) + 5
    x[0, 6:8, 8:10, 8:10] = 0  # a hole inside: filled, so it stays inside the box
    _, _, bbox = crop_to_nonzero(x.copy(), None)
    assert ops.crop_to_nonzero(x).tolist() == [list(b) for b in bbox] == [[3, 15], [5, 20], [2, 29]]
    assert ops.crop_to_nonzero(np.zeros((1, 4, 5, 6), np.float32)).tolist() == [[0, 4], [0, 5], [0, 6]]


@pytest.mark.parametrize(("size", "patch"), [((100, 130, 70), (48, 96, 96)), ((48, 96, 96), (48, 96, 96)),
                                             ((211, 53, 97), (40, 40, 40))])
def test_window_positions_are_nnunets(size: tuple[int, ...], patch: tuple[int, ...]) -> None:
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = [max(s, p) for s, p in zip(size, patch, strict=True)]
    assert ops.window_starts(padded, patch, 0.5) == compute_steps_for_sliding_window(padded, patch, 0.5)


@pytest.mark.parametrize("patch", [(48, 96, 96), (16, 32, 30)])
def test_gaussian_is_nnunets(patch: tuple[int, ...]) -> None:
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    ref = compute_gaussian(patch, 1 / 8, 10, device=torch.device("cpu")).numpy().astype(np.float32)
    got = ops.gaussian_weights(patch)
    assert got.max() == 10
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("mirror", [(), (0, 1, 2)])
def test_sliding_window_is_nnunet_predictors(mirror: tuple[int, ...]) -> None:
    """A random small UNet through nnUNetPredictor's sliding window vs ours: the same logits, from an image smaller
    than a patch on one axis. nnU-Net accumulates in float16, medseg in float32: they agree to float16's precision
    wherever the tiles' summed weight is representable in float16 (at the volume's corners nnU-Net's weighted
    logits underflow to 0; medseg keeps them)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1), conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}).eval()
    patch = (16, 24, 20)
    image = np.random.default_rng(1).normal(size=(1, 40, 20, 45)).astype(np.float32)
    predictor = nnUNetPredictor(0.5, True, bool(mirror), False, torch.device("cpu"), False, False, allow_tqdm=False)
    predictor.network, predictor.allowed_mirroring_axes = net, mirror
    predictor.configuration_manager = type("Config", (), {"patch_size": list(patch)})()
    predictor.label_manager = type("Labels", (), {"num_segmentation_heads": 3})()
    with torch.inference_mode():
        ref = predictor.predict_sliding_window_return_logits(torch.from_numpy(image)).float().numpy()

        def run(batch: np.ndarray) -> np.ndarray:
            return net(torch.from_numpy(batch)).numpy()

        got = ops.sliding_window(image, ops.Window(patch, 0.5, True, mirror), run, 3)
    assert got.shape == ref.shape == (3, 40, 20, 45)
    padded = (40, 24, 45)
    weight = np.zeros(padded, np.float32)
    g = ops.gaussian_weights(patch)
    for z, y, x in itertools.product(*ops.window_starts(padded, patch, 0.5)):
        weight[z:z + patch[0], y:y + patch[1], x:x + patch[2]] += g
    covered = weight[:, 2:22, :] > 1e-2  # the image sits in the middle of the padded y axis
    assert covered.mean() > 0.7
    np.testing.assert_allclose(got[:, covered], ref[:, covered], rtol=0, atol=1e-2 * float(np.abs(ref).max()))
    assert (got.argmax(0)[covered] == ref.argmax(0)[covered]).mean() > 0.999


@pytest.mark.parametrize(("spacing", "shape"), [((5.0, 0.8, 0.8), (24, 180, 170)), ((2.0, 2.5, 2.5), (50, 90, 100))])
def test_a_study_goes_in_and_comes_back_as_nnunet_does(spacing: tuple[float, ...], shape: tuple[int, ...]) -> None:
    """With the fixture's plans (transposed axes, CT normalisation): the network's input equals nnU-Net's
    DefaultPreprocessor's (crop of a zero border, thick slices or not), and logits on that grid come back to the
    study's grid as nnU-Net's export puts them (resampled, argmax, uncropped, transposed back)."""
    import json

    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from scipy import ndimage

    from export.nnunet_fixture import RESULTS_FOLDER
    from medseg.importers.nnunet import read_card

    plans = PlansManager(str(RESULTS_FOLDER / "plans.json"))
    config = plans.get_configuration("3d_fullres")
    dataset = json.loads((RESULTS_FOLDER / "dataset.json").read_text())
    card = read_card(RESULTS_FOLDER, "fixture", (), 0.5, [])
    rng = np.random.default_rng(7)
    ct = np.clip(ndimage.gaussian_filter(rng.normal(0, 400, shape), 2) * 3, -1000, 1500).astype(np.int16)
    ct[:, :6] = 0  # a zero border, cropped by both
    ct[:2] = 0
    image, geometry = ops.preprocess(ct, spacing, card)
    data, _, props = DefaultPreprocessor(verbose=False).run_case_npy(ct[None].astype(np.float32), None,
                                                                    {"spacing": list(spacing)}, plans, config, dataset)
    assert image.shape == data.shape
    np.testing.assert_allclose(image, data, rtol=0, atol=1e-4)
    assert geometry.tolist() == [*props["shape_before_cropping"], *(b[0] for b in props["bbox_used_for_cropping"]),
                                 *(b[1] for b in props["bbox_used_for_cropping"])]
    logits = ndimage.gaussian_filter(rng.normal(0, 1, (card.num_classes, *image.shape[1:])), (0, 2, 2, 2)).astype(np.float32)
    ref = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.copy(), plans, config, plans.get_label_manager(dataset), props)
    got = ops.labels_on_study(logits, geometry, spacing, card)
    assert got.shape == ref.shape == ct.shape
    assert (got == np.asarray(ref)).mean() > 0.9999


def test_a_model_trained_in_ras_sees_the_study_in_ras() -> None:
    """The card's orientation: an RAS model gets the canonical LPS study with x and y flipped, and its labels
    come back flipped onto the study's grid."""
    from dataclasses import replace

    from scipy import ndimage

    from export.nnunet_fixture import RESULTS_FOLDER
    from medseg.importers.nnunet import read_card

    lps = read_card(RESULTS_FOLDER, "fixture", (), 0.5, [])
    ras = replace(lps, orientation="RAS")
    rng = np.random.default_rng(3)
    ct = np.clip(ndimage.gaussian_filter(rng.normal(0, 400, (20, 60, 50)), 2) * 3, -1000, 1500).astype(np.int16)
    spacing = (4.0, 2.0, 2.5)
    image_ras, geometry_ras = ops.preprocess(ct, spacing, ras)
    image_lps, geometry_lps = ops.preprocess(np.ascontiguousarray(np.flip(ct, (1, 2))), spacing, lps)
    np.testing.assert_array_equal(image_ras, image_lps)
    assert geometry_ras.tolist() == geometry_lps.tolist()
    logits = rng.normal(0, 1, (lps.num_classes, *image_ras.shape[1:])).astype(np.float32)
    np.testing.assert_array_equal(ops.labels_on_study(logits, geometry_ras, spacing, ras),
                                  np.flip(ops.labels_on_study(logits, geometry_lps, spacing, lps), (1, 2)))
