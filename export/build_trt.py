"""Build the TensorRT engine of the segmenter from the ONNX export, and publish it only if it is accurate.

    python -m export.build_trt [--precision fp16|int8] [--out model_repository/ct_segmenter/1/model.plan]
    python -m export.build_trt --card model_repository/NAME        # an imported model's tile engine (fp16)

Run it where TensorRT and a GPU are (NVIDIA's TensorRT container: `docker compose run --rm engine`):
engines do not move between TensorRT versions or GPU models. The optimisation profile's min/opt/max
come from the spec's model-grid bounds; FP16 always, INT8 on request with entropy calibration on
phantom volumes; a timing cache beside the engine makes rebuilds fast. The accuracy gate compares the
engine's labels with ONNX Runtime's on held-out phantoms and refuses to publish below Dice 0.99 (FP16)
or 0.98 (INT8) per label, printing the figures either way. For an imported model (``--card``, the ensemble's
folder holding card.json) the profile is its tile with batches up to what its sliding window sends, the engine goes
beside the segmenter's ONNX as ``model.plan`` (what the GPU production config loads), and the gate compares labels
through the card's sliding window.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.accuracy.metrics import AGREEMENT_DICE, dice
from medseg.paths import ONNX_MODEL
from medseg_client.card import CARD_FILE, ModelCard, read_card
from medseg_client.errors import ArtifactError
from medseg_client.spec import SPEC, Label, padded_shape

GATE = {"fp16": AGREEMENT_DICE, "int8": 0.98}  # minimum Dice per label against ONNX Runtime
GATE_SEEDS = (4300, 4301, 4302)  # held out: never used in training, validation or the export check
CALIBRATION_SEEDS = tuple(range(4400, 4408))


@dataclass(frozen=True)
class Profile:
    """An optimisation profile: (batch, channel, z, y, x) shapes of the network input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def optimization_profile() -> Profile:
    """min/opt/max input shapes from the spec's model-grid bounds, padded to the network's divisor."""

    def shape(grid: tuple[int, int, int]) -> tuple[int, ...]:
        return (SPEC.max_batch_size, SPEC.network.in_channels, *padded_shape(grid))

    return Profile(shape(SPEC.min_model_grid), shape(SPEC.opt_model_grid), shape(SPEC.max_model_grid))


def fit_to(image: np.ndarray, spatial: Sequence[int]) -> np.ndarray:
    """Centre-crop or zero-pad a (C, Z, Y, X) image to ``spatial`` (for fixed-shape calibration batches)."""
    out = np.zeros((image.shape[0], *spatial), image.dtype)
    src, dst = [], []
    for n, m in zip(image.shape[1:], spatial, strict=True):
        if n >= m:
            start = (n - m) // 2
            src.append(slice(start, start + m))
            dst.append(slice(0, m))
        else:
            start = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    all_channels_dst = (slice(None), *dst)  # every channel, then the box (a name: 3.10 has no x[a, *b])
    all_channels_src = (slice(None), *src)  # every channel, then the box (a name: 3.10 has no x[a, *b])
    out[all_channels_dst] = image[all_channels_src]
    return out


def calibration_batches(seeds: Sequence[int] = CALIBRATION_SEEDS) -> Iterator[np.ndarray]:
    """Preprocessed phantom volumes at the profile's opt shape, (1, 1, Z, Y, X) float32, for INT8 calibration."""
    from medseg.ops.dali_pipeline import CpuPreprocessor
    from medseg.synth.phantom import generate

    pre = CpuPreprocessor()
    opt = optimization_profile().opt
    for seed in seeds:
        ph = generate(seed)
        image, _ = pre(ph.ct, np.asarray(ph.spacing, np.float32))
        yield np.ascontiguousarray(fit_to(image, opt[2:])[None])


@dataclass
class GateResult:
    """Per-label Dice of the engine against ONNX Runtime, worst over the studies, and the verdict."""

    precision: str
    threshold: float
    worst: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(d >= self.threshold for d in self.worst.values())

    def report(self) -> str:
        figures = ", ".join(f"{name} {d:.4f}" for name, d in self.worst.items())
        verdict = "passed" if self.passed else "FAILED"
        return f"accuracy gate ({self.precision}, Dice >= {self.threshold} per label vs ONNX Runtime): {figures}: {verdict}"


def accuracy_gate(pairs: Sequence[tuple[np.ndarray, np.ndarray]], precision: str,
                  labels: Sequence[Label] = SPEC.labels) -> GateResult:
    """Judge (reference labels, engine labels) pairs: the worst Dice per label must reach the gate."""
    if precision not in GATE:
        raise ValueError(f"precision must be one of {sorted(GATE)}, got {precision!r}")
    worst = {lab.name: 1.0 for lab in labels[1:]}
    for ref, got in pairs:
        if ref.shape != got.shape:
            raise ValueError(f"label volumes differ in shape: {ref.shape} vs {got.shape}")
        for lab in labels[1:]:
            worst[lab.name] = min(worst[lab.name], dice(ref == lab.value, got == lab.value))
    return GateResult(precision, GATE[precision], worst)


def _tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ArtifactError("TensorRT is not installed here: build the engine in NVIDIA's TensorRT container "
                            "(`docker compose --profile build run --rm engine`)") from e
    return trt


class EntropyCalibrator:
    """INT8 entropy calibration over :func:`calibration_batches`, device buffers held by PyTorch."""

    def __new__(cls, batches: Iterator[np.ndarray], cache: Path) -> Any:  # a subclass of TensorRT's own class
        trt = _tensorrt()
        import torch

        class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                super().__init__()
                self.batches, self.cache = batches, cache
                self.current: Any = None  # the batch on the GPU, kept alive while TensorRT reads it

            def get_batch_size(self) -> int:
                return SPEC.max_batch_size

            def get_batch(self, names: list[str]) -> list[int] | None:
                batch = next(self.batches, None)
                if batch is None:
                    return None
                self.current = torch.from_numpy(batch).cuda()
                return [int(self.current.data_ptr())]

            def read_calibration_cache(self) -> bytes | None:
                return self.cache.read_bytes() if self.cache.exists() else None

            def write_calibration_cache(self, data: bytes) -> None:
                self.cache.write_bytes(bytes(data))

        return _Calibrator()


def card_profile(card: ModelCard) -> Profile:
    """An imported model's profile: its tile, batches of 1 up to what its sliding window sends at once (the
    mirrored copies of a tile for nnU-Net, the inferer's tile batch for MONAI)."""
    from medseg.serving.flavors import card_ops

    tile = (card.in_channels, *card.inference.patch)
    batch = card_ops(card).tile_batch(card)
    return Profile((1, *tile), (batch, *tile), (batch, *tile))


def build_engine(onnx_path: Path, out: Path, precision: str, profile_shapes: Profile | None = None) -> None:
    """Parse the ONNX model and build a serialized engine with the spec's profile (or the one given) into ``out``."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    p = profile_shapes or optimization_profile()
    (image,) = SPEC.segmenter.inputs  # "IMAGE", as every imported model's tile network names its input too
    profile.set_shape(image.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(profile)
        config.int8_calibrator = EntropyCalibrator(calibration_batches(), out.with_suffix(".calib"))
    cache_path = out.with_suffix(".timing_cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError("TensorRT failed to build the engine (see the log above)")
    out.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


def gate_engine(engine_path: Path, onnx_path: Path, precision: str, seeds: Sequence[int] = GATE_SEEDS) -> GateResult:
    """Labels of the engine vs ONNX Runtime on held-out phantoms, through the same preprocessing (both give the
    head's labels and probabilities; the labels on the unpadded model grid are compared)."""
    from medseg.model.inference import OnnxSegmenter, TensorRTTiles
    from medseg.ops.dali_pipeline import CpuPreprocessor
    from medseg.ops.postprocess import model_grid_labels
    from medseg.synth.phantom import generate

    _tensorrt()
    pre, ort, engine = CpuPreprocessor(), OnnxSegmenter(onnx_path), TensorRTTiles(engine_path)
    pairs = []
    for seed in seeds:
        ph = generate(seed)
        image, grid = pre(ph.ct, np.asarray(ph.spacing, np.float32))
        want, got = ort(image), engine(image)
        pairs.append((model_grid_labels(want[0], want[1], grid), model_grid_labels(got[0], got[1], grid)))
    return accuracy_gate(pairs, precision)


def gate_card_engine(engine_path: Path, onnx_path: Path, card: ModelCard, precision: str,
                     seeds: Sequence[int] = GATE_SEEDS) -> GateResult:
    """An imported model's engine vs ONNX Runtime through the card's sliding window on held-out phantoms: the labels
    on the model grid, Dice per label."""
    from medseg.model.inference import OnnxSegmenter, TensorRTTiles
    from medseg.serving.flavors import card_ops
    from medseg.synth.phantom import generate

    ops, ort, engine = card_ops(card), OnnxSegmenter(onnx_path), TensorRTTiles(engine_path)
    pairs = []
    for seed in seeds:
        ph = generate(seed, num_slices=64)
        image, _ = ops.preprocess(ph.ct, ph.spacing, card)
        pairs.append((ops.logits(image, card, ort.run).argmax(0), ops.logits(image, card, engine.run).argmax(0)))
    return accuracy_gate(pairs, precision, card.labels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=sorted(GATE), default="fp16")
    ap.add_argument("--onnx", type=Path, default=ONNX_MODEL)
    ap.add_argument("--out", type=Path, default=None, help="the engine file (default: model.plan beside the ONNX)")
    ap.add_argument("--card", type=Path, default=None,
                    help="an imported model's ensemble folder (holding card.json): build its tile engine")
    args = ap.parse_args(argv)
    t0 = time.time()
    staged = None
    try:
        card = None
        if args.card is not None:
            card = read_card(args.card / CARD_FILE)
            if args.precision != "fp16":
                raise ArtifactError("--card engines are FP16 (INT8 calibration data exists for the shipped model only)")
            args.onnx = args.card.parent / card.model_io("segmenter").name / "1" / card.onnx_file
        out = args.out or args.onnx.with_name("model.plan")
        staged = out.with_suffix(".plan.tmp")
        if not args.onnx.exists():
            raise ArtifactError(f"{args.onnx} not found: run `make artifacts` (or `medseg import`) first")
        p = card_profile(card) if card else optimization_profile()
        print(f"building {args.precision} engine: profile min {p.min} opt {p.opt} max {p.max}", flush=True)
        build_engine(args.onnx, staged, args.precision, p)
        result = gate_card_engine(staged, args.onnx, card, args.precision) if card else \
            gate_engine(staged, args.onnx, args.precision)
        print(result.report())
        if not result.passed:
            raise ArtifactError("the engine is not published")
        staged.replace(out)
    except ArtifactError as e:
        if staged is not None:
            staged.unlink(missing_ok=True)
        print(f"engine build failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
