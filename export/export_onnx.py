"""Export the shipped weights with the segmenter's head to ONNX (pinned opset, dynamic spatial axes) and verify it
against PyTorch.

    python -m export.export_onnx [--out model_repository/ct_segmenter/1/model.onnx] [--tolerance 1e-3]

The graph is the network and its head (``medseg.model.head``): (1, 1, Z, Y, X) image -> uint8 labels and float16
probabilities. Verification runs PyTorch and ONNX Runtime on the same preprocessed phantom volume, prints the
largest probability difference and the label agreement, and fails past the tolerance, leaving no model behind.
On success it writes provenance.json beside the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medseg.model.network import sha256_of, weights_info
from medseg.model.provenance import FILENAME
from medseg.paths import ONNX_MODEL
from medseg_client.errors import ArtifactError
from medseg_client.spec import SPEC

DEFAULT_OUT = ONNX_MODEL
VERIFY_SEED = 4242  # a phantom outside the training and validation seeds
MIN_AGREEMENT = 0.999  # fraction of voxels whose label must match


def export(path: Path) -> None:
    """Write the ONNX graph of the shipped network and its head: (1, 1, Z, Y, X) -> (1, Z, Y, X) labels and
    (1, 2, Z, Y, X) probabilities, Z/Y/X dynamic."""
    import torch

    from medseg.model.head import load_segmenter

    (image,) = SPEC.segmenter.inputs
    labels, probabilities = SPEC.segmenter.outputs
    d = SPEC.network.size_divisor
    dummy = torch.zeros(1, SPEC.network.in_channels, 2 * d, 2 * d, 2 * d)
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    torch.onnx.export(
        load_segmenter(), (dummy,), str(path), input_names=[image.name],
        output_names=[labels.name, probabilities.name], opset_version=SPEC.network.onnx_opset, dynamo=False,
        dynamic_axes={image.name: axes, labels.name: {0: "batch", 1: "z", 2: "y", 3: "x"}, probabilities.name: axes},
    )


def verify(path: Path, tolerance: float) -> dict[str, float]:
    """Compare ONNX Runtime with PyTorch on a phantom; raise ArtifactError past ``tolerance`` (probabilities) or
    below ``MIN_AGREEMENT`` (labels), or where the outputs' names and types are not the spec's."""
    import onnx
    import torch

    from medseg.model.head import load_segmenter
    from medseg.model.inference import OnnxSegmenter
    from medseg.ops.dali_pipeline import CpuPreprocessor
    from medseg.synth.phantom import generate

    onnx.checker.check_model(str(path))
    ph = generate(VERIFY_SEED, num_slices=80)
    image, _ = CpuPreprocessor()(ph.ct, np.asarray(ph.spacing, np.float32))
    with torch.inference_mode():
        ref = [o.numpy()[0] for o in load_segmenter()(torch.from_numpy(image[None]))]
    session = OnnxSegmenter(path)
    got = [o[0] for o in session.run_all(image[None])]
    want = [(t.name, t.numpy_dtype) for t in SPEC.segmenter.outputs]
    if [(n, g.dtype) for n, g in zip(session.output_names, got, strict=False)] != want:
        raise ArtifactError(f"ONNX outputs {[(n, str(g.dtype)) for n, g in zip(session.output_names, got, strict=False)]}, "
                            f"the spec names {[(n, str(d)) for n, d in want]}")
    diff = float(np.abs(ref[1].astype(np.float32) - got[1].astype(np.float32)).max())
    agree = float((ref[0] == got[0]).mean())
    print(f"ONNX Runtime vs PyTorch on phantom {VERIFY_SEED} {image.shape[1:]}: max |probability diff| = {diff:.2e} "
          f"(tolerance {tolerance:.0e}), label agreement {agree:.6f} (minimum {MIN_AGREEMENT})")
    if not diff <= tolerance:
        raise ArtifactError(f"ONNX probabilities differ from PyTorch's by {diff:.3e}, over {tolerance:.0e}")
    if not agree >= MIN_AGREEMENT:
        raise ArtifactError(f"ONNX labels agree with PyTorch's on {agree:.6f} of voxels, below {MIN_AGREEMENT}")
    return {"max_abs_probability_diff": diff, "label_agreement": agree}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tolerance", type=float, default=1e-3, help="max |probability diff| between ONNX Runtime and PyTorch")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        info = weights_info()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
            staged = Path(tmp) / args.out.name
            export(staged)
            check = verify(staged, args.tolerance)
            staged.replace(args.out)
    except ArtifactError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    record = {
        "ensemble": SPEC.ensemble.name,
        "model": SPEC.segmenter.name,
        "version": SPEC.segmenter.version,
        "spec_version": SPEC.version,
        "weights_sha256": info.sha256,
        "onnx_sha256": sha256_of(args.out),
        "onnx_opset": SPEC.network.onnx_opset,
        "val_dice": info.manifest.get("val_dice"),
        "export_check": check,
    }
    (args.out.parent / FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} and {FILENAME} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
