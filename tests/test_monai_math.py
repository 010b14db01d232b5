"""medseg.ops.monai against MONAI's own transforms (the installed monai is the oracle): Spacing's grid and
interpolation, the intensity transforms, the sliding-window inferer's tiles and blending, and the whole bundle
chain (Orientation, Spacing, ScaleIntensityRange, sliding window, softmax, Invertd, argmax) on a small random
network, from a NIfTI file stored LPS and one stored RAS."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.ops import monai as ops
from medseg_client.card import Inference, ModelCard, Normalization, Resampling
from medseg_client.io.studies import _RAS_FROM_LPS, read_nifti, save_nifti
from medseg_client.spec import Label

warnings.filterwarnings("ignore", module="monai")

GEOMETRIES = [
    ((20, 30, 28), (1.0, 1.0, 1.0), (1.5, 0.8, 1.2)),
    ((12, 40, 36), (5.0, 0.8, 0.8), (3.0, 1.5, 1.5)),
    ((31, 25, 25), (1.5, 1.5, 1.5), (4.9, 1.0, 1.0)),
    ((10, 20, 20), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0)),  # same grid: untouched
]


def _meta(x: np.ndarray, spacing: tuple[float, ...]) -> torch.Tensor:
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(x), affine=torch.from_numpy(np.diag([*spacing, 1.0])))


@pytest.mark.parametrize(("shape", "spacing", "pixdim"), GEOMETRIES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_spacing_is_monais(shape: tuple[int, ...], spacing: tuple[float, ...], pixdim: tuple[float, ...], mode: str) -> None:
    from monai.transforms import Spacing

    x = np.random.default_rng(len(shape)).normal(size=(2, *shape)) * 300
    ref = np.asarray(Spacing(pixdim=pixdim, mode=mode)(_meta(x, spacing)))
    new = ops.spacing_shape(shape, spacing, pixdim)
    assert new == ref.shape[1:]
    scale = [p / s for p, s in zip(pixdim, spacing, strict=True)]
    got = ops.resample(x, new, scale, 1 if mode == "bilinear" else 0)
    if mode == "nearest":  # a sample exactly half-way between two voxels is a tie either side may round
        ties = [np.isclose((np.arange(n) * f) % 1, 0.5) for n, f in zip(new, scale, strict=True)]
        keep = ~(ties[0][:, None, None] | ties[1][None, :, None] | ties[2][None, None, :])
        assert keep.mean() > 0.2
        got, ref = got[:, keep], ref[:, keep]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)


def test_the_way_back_is_monais_inverse() -> None:
    """Invertd's inverse of Spacing: the study grid sampled from the model grid, linearly, edges clamped."""
    from monai.transforms import Spacing

    shape, spacing, pixdim = (23, 17, 29), (0.8, 1.3, 2.5), (1.5, 1.5, 1.5)
    x = _meta(np.random.default_rng(0).normal(size=(1, *shape)), spacing)
    t = Spacing(pixdim=pixdim, mode="bilinear")
    small = t(x)
    small = small * 0 + torch.from_numpy(np.random.default_rng(1).normal(size=small.shape))  # the network's output
    ref = np.asarray(t.inverse(small))
    got = ops.resample(np.asarray(small.as_tensor()), shape, [s / p for s, p in zip(spacing, pixdim, strict=True)], 1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_intensity_is_monais() -> None:
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    x = np.random.default_rng(0).normal(size=(1, 9, 8, 7)).astype(np.float32) * 500
    card = _card(Normalization("scale_range", -57, 164, out_lower=-1, out_upper=2, clip=True))
    np.testing.assert_allclose(ops.normalize(x, card), np.asarray(ScaleIntensityRange(-57, 164, -1, 2, clip=True)(x)),
                               rtol=1e-6, atol=1e-5)
    card = _card(Normalization("zscore", 0, 0, mean=40.0, std=250.0))
    np.testing.assert_allclose(ops.normalize(x, card), np.asarray(NormalizeIntensity(subtrahend=40.0, divisor=250.0)(x)),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(("size", "roi", "overlap"), [((100, 130, 70), (64, 64, 64), 0.5), ((64, 64, 64), (64, 64, 64), 0.25),
                                                      ((211, 53, 97), (40, 48, 40), 0.6), ((30, 20, 90), (32, 32, 32), 0.25)])
def test_window_positions_are_monais(size: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = [max(s, r) for s, r in zip(size, roi, strict=True)]
    slices = dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, 3, [overlap] * 3))
    starts = sorted({tuple(s.start for s in sl) for sl in slices})
    got = ops.window_starts(padded, roi, 1 - overlap)
    assert starts == sorted(itertools.product(*got))


@pytest.mark.parametrize("roi", [(32, 32, 32), (15, 24, 20)])
def test_importance_map_is_monais(roi: tuple[int, ...]) -> None:
    from monai.data.utils import compute_importance_map

    ref = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125).numpy()
    np.testing.assert_allclose(ops.importance_map(roi, True), ref, rtol=1e-6, atol=1e-7)


def _net(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(8, classes, 3, padding=1)).eval()


@pytest.mark.parametrize(("size", "mode"), [((70, 50, 45), "gaussian"), ((20, 40, 70), "constant")])
def test_sliding_window_is_monais(size: tuple[int, ...], mode: str) -> None:
    from monai.inferers import SlidingWindowInferer

    net = _net()
    x = np.random.default_rng(0).normal(size=(1, *size)).astype(np.float32)
    with torch.inference_mode():
        ref = SlidingWindowInferer((32, 32, 32), sw_batch_size=3, overlap=0.5, mode=mode)(torch.from_numpy(x[None]), net)[0]
        got = ops.sliding_window(x, (32, 32, 32), 0.5, mode == "gaussian",
                                 lambda b: net(torch.from_numpy(b)).numpy(), 3)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-4)


def _card(norm: Normalization | None = None, orientation: str = "RAS") -> ModelCard:
    return ModelCard(
        name="t", version=1, description="", spacing=(1.6, 1.6, 2.0), transpose=(2, 1, 0), crop_to_nonzero=False,
        labels=tuple(Label(v, f"l{v}", f"L{v}", (v, v, v)) for v in range(3)),
        normalization=norm or Normalization("scale_range", -150, 250, out_lower=0, out_upper=1, clip=True),
        resampling=Resampling(1, 1, 0, softmax=True), inference=Inference("sliding_window", (32, 32, 32), 0.5, True),
        orientation=orientation, pipeline="monai")


@pytest.mark.parametrize("stored", ["LPS", "RAS"])
def test_bundle_chain_is_monais(tmp_path: Path, stored: str) -> None:
    """The whole chain from a NIfTI file: MONAI's transforms, inferer and Invertd vs medseg's canonical study
    through ops.monai: the network input to 1e-3, the labels on > 99.9 % of voxels."""
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    rng = np.random.default_rng(3)
    native = (rng.normal(size=(37, 41, 23)) * 200).astype(np.int16)  # (x, y, z) as stored
    sx, sy, sz = 0.9, 1.1, 2.5
    if stored == "LPS":
        affine = _RAS_FROM_LPS @ np.array([[sx, 0, 0, 10], [0, sy, 0, -5], [0, 0, sz, 30], [0, 0, 0, 1.0]])
    else:
        affine = np.array([[sx, 0, 0, 10], [0, sy, 0, -5], [0, 0, sz, 30], [0, 0, 0, 1.0]])
    path = tmp_path / "ct.nii.gz"
    save_nifti(native, affine, path)
    card = _card()
    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
                   Spacingd("image", pixdim=card.spacing, mode="bilinear"),
                   ScaleIntensityRanged("image", -150, 250, 0.0, 1.0, clip=True)])
    post = Compose([Activationsd("pred", softmax=True),
                    Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
                    AsDiscreted("pred", argmax=True)])
    net = _net()
    d = pre({"image": str(path)})
    with torch.inference_mode():
        d["pred"] = SlidingWindowInferer((32, 32, 32), 2, 0.5, mode="gaussian")(d["image"][None], net)[0]
    ref = np.asarray(post(d)["pred"])[0]

    study = read_nifti(path)
    image, geometry = ops.preprocess(study.ct, study.spacing, card)
    np.testing.assert_allclose(image, np.asarray(d["image"]), rtol=0, atol=1e-3)
    with torch.inference_mode():
        logits = ops.sliding_window(image, (32, 32, 32), 0.5, True, lambda b: net(torch.from_numpy(b)).numpy(), 3)
    labels = ops.labels_on_study(logits, geometry, study.spacing, card)
    assert labels.shape == study.ct.shape
    # Invertd gives the labels in the file's stored voxel order: onto the canonical grid as medseg reads files
    save_nifti(ref.astype(np.int16), affine, tmp_path / "ref.nii.gz")
    ref_canonical = read_nifti(tmp_path / "ref.nii.gz").ct
    assert len(np.unique(ref_canonical)) == 3
    assert np.mean(labels == ref_canonical) > 0.999
    # the order of the way back matters: argmax before resampling (nearest) is a different, stated card
    nearest = ops.labels_on_study(logits, geometry, study.spacing, replace(card, resampling=Resampling(1, 0, 0)))
    assert nearest.shape == labels.shape
