"""nnU-Net v2's inference math, restated in numpy/scipy for imported models (pure functions, no nnU-Net import).

What an nnU-Net predictor does to a study, step by step, so that a served model gives the labels its own
``nnUNetPredictor`` gives: transpose, crop to the non-zero region, CT normalisation, resampling to the plans'
spacing (third-order splines; in-plane only and nearest along the coarse axis for anisotropic data), a
Gaussian-weighted sliding window with mirroring, and the way back (logits resampled linearly to the cropped shape,
argmax, the crop put back, transposed back). Arrays are (z, y, x) with a leading channel axis where noted.

One deliberate difference: nnU-Net accumulates the window's logits in float16; here they add up in float32, which
changes labels only where two classes tie to within float16's precision.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg_client.card import ModelCard

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net resamples the coarse axis apart from the others past this spacing ratio


# ------------------------------------------------------------------------------------------------ geometry


def crop_to_nonzero(data: np.ndarray) -> np.ndarray:
    """The bounding box (3 x [lo, hi)) of the voxels that are non-zero in any channel, holes filled; the whole
    volume if none is. ``data`` is (C, z, y, x)."""
    mask = ndimage.binary_fill_holes(np.any(data != 0, axis=0))
    bbox = np.zeros((3, 2), np.int64)
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        bbox[axis] = (hit[0], hit[-1] + 1) if hit.size else (0, mask.shape[axis])
    return bbox


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """The size of each axis at the new spacing, rounded as nnU-Net rounds it (Python's round: halves to even)."""
    return tuple(round(s / n * k) for k, s, n in zip(shape, spacing, new_spacing, strict=True))


def separate_axis(spacing: Sequence[float], new_spacing: Sequence[float]) -> int | None:
    """The axis resampled apart from the other two (the one coarse axis of anisotropic data), or None.

    The source spacing decides first, then the target's; an axis counts only if it alone has the largest spacing."""
    for sp in (np.asarray(spacing, np.float64), np.asarray(new_spacing, np.float64)):
        if sp.max() / sp.min() > ANISOTROPY_THRESHOLD:
            coarse = np.flatnonzero(sp.max() / sp == 1)
            return int(coarse[0]) if coarse.size == 1 else None
    return None


def _zoom(x: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Spline resampling with pixel centres aligned (voxel j samples (j + 0.5) * n_in / n_out - 0.5), edges
    extended, clipped to the input's range (what skimage's ``resize`` does, which nnU-Net calls)."""
    out = ndimage.zoom(x.astype(np.float64, copy=False), [n / k for n, k in zip(shape, x.shape, strict=True)],
                       order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # zoom rounds in_size * factor; guard against a float landing below .5
        raise ValueError(f"resampling to {tuple(shape)} gave {out.shape}")
    return np.clip(out, x.min(), x.max())


def resample(data: np.ndarray, shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float],
             order: int, order_z: int = 0, axis: int | None = None, out_dtype: np.dtype | None = None) -> np.ndarray:
    """(C, z, y, x) ``data`` at ``spacing`` onto ``shape`` at ``new_spacing``: order-``order`` splines on every axis,
    or, when ``axis`` is given (see :func:`separate_axis`), in-plane per slice and order-``order_z`` along ``axis``."""
    shape = tuple(int(s) for s in shape)
    dtype = out_dtype or data.dtype
    if tuple(data.shape[1:]) == shape:
        return data.astype(dtype, copy=False)
    out = np.empty((data.shape[0], *shape), dtype)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = _zoom(data[c], shape, order)
            continue
        plane = [s for a, s in enumerate(shape) if a != axis]
        slices = np.moveaxis(data[c], axis, 0)
        inplane = np.stack([_zoom(s, plane, order) for s in slices])
        n_in, n_out = data.shape[1 + axis], shape[axis]
        if n_in != n_out:
            if order_z != 0:
                raise ValueError(f"order along the separate axis must be 0 (nearest), got {order_z}")
            idx = np.clip(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)), 0, n_in - 1).astype(np.int64)
            inplane = inplane[idx]
        out[c] = np.moveaxis(inplane, 0, axis)
    return out


# ------------------------------------------------------------------------------------------------ intensity


def ct_normalize(x: np.ndarray, lower: float, upper: float, mean: float, std: float) -> np.ndarray:
    """nnU-Net's CT normalisation: clip to the foreground's 0.5-99.5 percentiles, then standardise by its mean and
    standard deviation (all from the training set's fingerprint), in float32."""
    x = np.clip(x.astype(np.float32, copy=False), np.float32(lower), np.float32(upper))
    x -= np.float32(mean)
    x /= np.float32(max(std, 1e-8))
    return x


# ------------------------------------------------------------------------------------------------ sliding window


def window_starts(size: Sequence[int], patch: Sequence[int], step: float) -> list[list[int]]:
    """Start of every tile along each axis: evenly spaced, at most ``step * patch`` apart, covering the volume."""
    starts = []
    for s, p in zip(size, patch, strict=True):
        n = int(np.ceil((s - p) / (p * step))) + 1
        stride = (s - p) / (n - 1) if n > 1 else 0.0
        starts.append([int(np.round(stride * i)) for i in range(n)])
    return starts


def gaussian_weights(patch: Sequence[int], sigma_scale: float = 1 / 8, peak: float = 10.0) -> np.ndarray:
    """The importance of each voxel of a tile: a Gaussian (sigma = patch * sigma_scale) around its centre, peak
    ``peak``, truncated at 4 sigma; zeros raised to the smallest positive weight so every voxel counts."""
    impulse = np.zeros(tuple(patch), np.float64)
    impulse[tuple(p // 2 for p in patch)] = 1
    g = ndimage.gaussian_filter(impulse, [p * sigma_scale for p in patch], order=0, mode="constant", cval=0)
    g = (g / (g.max() / peak)).astype(np.float16).astype(np.float32)  # nnU-Net keeps the map in float16
    g[g == 0] = g[g != 0].min()
    return g


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty set of spatial axes to flip for test-time mirroring (plus the unflipped input)."""
    return [(), *(c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k))]


@dataclass(frozen=True)
class Window:
    """How the segmenter tiles a volume."""

    patch: tuple[int, int, int]
    step: float = 0.5
    gaussian: bool = True
    mirror_axes: tuple[int, ...] = (0, 1, 2)


def sliding_window(image: np.ndarray, window: Window, predict: Callable[[np.ndarray], np.ndarray],
                   num_classes: int) -> np.ndarray:
    """Logits (K, z, y, x) of a (C, z, y, x) ``image``: padded with 0 to at least a patch, tiled, each tile
    predicted with its mirrored copies (``predict`` takes a batch (B, C, *patch) and returns (B, K, *patch)), the
    mirrored logits un-flipped and averaged, tiles blended with Gaussian weights, the padding cut off."""
    size = image.shape[1:]
    padded = [max(s, p) for s, p in zip(size, window.patch, strict=True)]
    lo = [(p - s) // 2 for s, p in zip(size, padded, strict=True)]
    if padded != list(size):
        image = np.pad(image, [(0, 0), *((a, p - s - a) for a, s, p in zip(lo, size, padded, strict=True))])
    weights = gaussian_weights(window.patch) if window.gaussian else np.ones(window.patch, np.float32)
    flips = mirror_combinations(window.mirror_axes)
    logits = np.zeros((num_classes, *padded), np.float32)
    norm = np.zeros(padded, np.float32)
    for z, y, x in itertools.product(*window_starts(padded, window.patch, window.step)):
        sl = (slice(z, z + window.patch[0]), slice(y, y + window.patch[1]), slice(x, x + window.patch[2]))
        tile = image[(slice(None), sl[0], sl[1], sl[2])]
        batch = np.stack([np.flip(tile, [a + 1 for a in f]) if f else tile for f in flips])
        out = np.asarray(predict(np.ascontiguousarray(batch, np.float32)), np.float32)
        mean = sum(np.flip(o, [a + 1 for a in f]) if f else o for o, f in zip(out, flips, strict=True)) / len(flips)
        logits[:, sl[0], sl[1], sl[2]] += mean * weights
        norm[sl] += weights
    logits /= norm
    keep = tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))
    return logits[:, keep[0], keep[1], keep[2]]


# ------------------------------------------------------------------------------------------------ a study through a card


def tile_batch(card: ModelCard) -> int:
    """The most tiles the window sends the network at once: a tile and its mirrored copies."""
    return len(mirror_combinations(card.inference.mirror_axes))


def logits(image: np.ndarray, card: ModelCard, predict: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The card's sliding window over a preprocessed image (``predict``: a batch of tiles -> their logits)."""
    inf = card.inference
    window = Window(tuple(inf.patch), inf.step, inf.gaussian, inf.mirror_axes)  # type: ignore[arg-type]
    return sliding_window(image, window, predict, card.num_classes)


def preprocess(ct: np.ndarray, spacing: Sequence[float], card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """A canonical (z, y, x) LPS study at ``spacing`` -> the network's input (C, *grid), flipped to the card's
    orientation, and the geometry the way back needs: int64 [shape before cropping (3), crop box lo (3), crop box
    hi (3)], in the model's axis order."""
    t = card.transpose
    data = np.flip(np.asarray(ct, np.float32), card.flips())[None].transpose(0, *(a + 1 for a in t))
    sp = [float(spacing[a]) for a in t]
    before = data.shape[1:]
    bbox = crop_to_nonzero(data) if card.crop_to_nonzero else np.array([[0, n] for n in before], np.int64)
    data = data[:, bbox[0, 0]:bbox[0, 1], bbox[1, 0]:bbox[1, 1], bbox[2, 0]:bbox[2, 1]]
    norm = card.normalization
    if norm.kind == "ct":
        data = ct_normalize(data, norm.lower, norm.upper, norm.mean, norm.std)
    elif norm.kind == "window":
        data = (np.clip(data, norm.lower, norm.upper) - np.float32(norm.lower)) * np.float32(1 / (norm.upper - norm.lower))
    else:
        raise ValueError(f"normalization must be ct or window, got {norm.kind!r}")
    shape = resampled_shape(data.shape[1:], sp, card.spacing)
    image = resample(data, shape, sp, card.spacing, card.resampling.data_order, card.resampling.order_z,
                     separate_axis(sp, card.spacing), np.dtype(np.float32))
    return image, np.concatenate([before, bbox[:, 0], bbox[:, 1]]).astype(np.int64)


def labels_on_study(logits: np.ndarray, geometry: np.ndarray, spacing: Sequence[float], card: ModelCard) -> np.ndarray:
    """Logits (K, *grid) -> uint8 labels on the study's (z, y, x) grid: logits resampled linearly onto the cropped
    region, argmax, the crop put back into a background volume, axes transposed back."""
    t = card.transpose
    sp = [float(spacing[a]) for a in t]
    before, lo, hi = (tuple(int(v) for v in geometry[i:i + 3]) for i in (0, 3, 6))
    cropped = tuple(h - low for low, h in zip(lo, hi, strict=True))
    # the target spacing decides the separate axis first on the way back (nnU-Net passes the spacings swapped);
    # class by class with a running argmax (ties to the lower class, as argmax), so memory holds one class at a time
    axis = separate_axis(card.spacing, sp)
    best = np.full(cropped, -np.inf, np.float32)
    arg = np.zeros(cropped, np.uint8)
    for k in range(logits.shape[0]):
        back = resample(logits[k:k + 1], cropped, card.spacing, sp, card.resampling.logits_order,
                        card.resampling.order_z, axis, np.dtype(np.float32))[0]
        better = back > best
        best[better], arg[better] = back[better], k
    labels = np.zeros(before, np.uint8)
    labels[tuple(slice(low, h) for low, h in zip(lo, hi, strict=True))] = arg
    return np.ascontiguousarray(np.flip(labels.transpose(np.argsort(t)), card.flips()))
