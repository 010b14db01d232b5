"""The MONAI pipeline people run today, in-process, with this project's weights: the baseline of ``make bench``.

As in MONAI's CT segmentation tutorials: channel-first (x, y, z) volume with its affine, Spacing to
1.5 x 1.5 x 2.0 mm (bilinear), ScaleIntensityRange of the HU window to 0..1 (clipped), sliding-window
inference on 96^3 patches (overlap 0.25, 4 patches a batch, gaussian blending), the logits inverted
back onto the input grid (Invert of the spacing, bilinear) and argmax. The network is this project's
UNet with the shipped weights; it was trained on (z, y, x) volumes, so the predictor transposes.
On a GPU (``device="cuda"``) the whole pipeline runs on it, the volume copied there first and the labels
back, as MONAI's GPU transforms allow: the strongest form of the baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg_client.spec import SPEC


class MonaiBaseline:
    """Call with an int16 (z, y, x) CT and its (z, y, x) spacing; returns uint8 labels on the input grid."""

    def __init__(self, roi_size: int = 96, overlap: float = 0.25, sw_batch_size: int = 4, threads: int | None = None,
                 device: str = "cpu") -> None:
        import torch
        from monai.transforms import Compose, ScaleIntensityRange, Spacing

        from medseg.model.network import load_network

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.net = load_network().to(self.device)
        lo, hi = SPEC.hu_window
        pixdim_xyz = tuple(reversed(SPEC.model_spacing))
        self.pre = Compose([
            Spacing(pixdim=pixdim_xyz, mode="bilinear"),
            ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        ])
        self.roi = (roi_size,) * 3
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size

    def _predict(self, patch_xyz: Any) -> Any:
        zyx = patch_xyz.permute(0, 1, 4, 3, 2)
        return self.net(zyx).permute(0, 1, 4, 3, 2)

    def __call__(self, ct: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        import torch
        from monai.data import MetaTensor
        from monai.inferers import sliding_window_inference

        sz, sy, sx = (float(s) for s in spacing)
        volume = torch.from_numpy(np.ascontiguousarray(ct)).to(self.device).permute(2, 1, 0)[None].float()  # (1, x, y, z)
        image = self.pre(MetaTensor(volume, affine=torch.diag(torch.tensor([sx, sy, sz, 1.0], dtype=torch.float64))))
        with torch.inference_mode():
            logits = sliding_window_inference(image[None], self.roi, self.sw_batch_size, self._predict,
                                              overlap=self.overlap, mode="gaussian")
        pred = MetaTensor(logits[0], meta=image.meta)  # the resampled grid's affine is in its meta
        pred.applied_operations = image.applied_operations
        with torch.inference_mode():
            back = self.pre.inverse(pred)
        labels = torch.as_tensor(back).argmax(0).permute(2, 1, 0)  # (z, y, x)
        return labels.to(torch.uint8).cpu().numpy()


def run_file(source: Path, out: Path, device: str = "cpu") -> dict[str, float]:
    """The pipeline as a script runs it on a file: MONAI's LoadImage and Orientation (to the (z, y, x) LPS grid the
    network was trained on), the baseline, SaveImage of the labels; the seconds of each part."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import LoadImage, Orientation, SaveImage

    t0 = time.perf_counter()
    baseline = MonaiBaseline(device=device)
    t1 = time.perf_counter()
    image: Any = Orientation(axcodes="LPS")(LoadImage(image_only=True, ensure_channel_first=True)(str(source)))
    sx, sy, sz = (float(s) for s in image.pixdim[:3])
    ct = np.clip(image[0].numpy(), -1024, 3071).astype(np.int16).transpose(2, 1, 0)  # (z, y, x)
    t2 = time.perf_counter()
    labels = baseline(np.ascontiguousarray(ct), (sz, sy, sx))
    t3 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    result = MetaTensor(torch.from_numpy(np.ascontiguousarray(labels.transpose(2, 1, 0)))[None], meta=image.meta)
    SaveImage(output_dir=str(out), output_postfix="labels", output_dtype=np.uint8, separate_folder=False,
              print_log=False)(result)
    t4 = time.perf_counter()
    return {"setup_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3), "pipeline_s": round(t3 - t2, 3),
            "save_s": round(t4 - t3, 3), "file_to_file_s": round(t4 - t1, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The MONAI baseline on a NIfTI file, as a script runs it; prints its "
                                             "timings as one JSON line.")
    ap.add_argument("source", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    print(json.dumps(run_file(args.source, args.out, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
