"""The user's command as a whole: ``medseg segment FILE --out DIR`` timed as a new process, beside the MONAI pipeline
on the same file, in the same run (part of ``make bench``; ``perf.bench`` calls ``measure``).

The studies are files, as users have them: the bench phantom written as NIfTI, and TotalSegmentator's real CT
(``make realct``) resampled onto a 512 x 512 x 300 grid over its own extent (trilinear, int16, gzipped by
nibabel as most tools write it). Each medseg run is split by its findings.json: reading the file, the request
(server steps as Triton counts them), each output written, and the process start (wall - the command's own
total). The MONAI pipeline runs as its users run a script: ``python -m perf.monai_baseline FILE --out DIR``
(MONAI's LoadImage and Orientation, the baseline pipeline, SaveImage); the ratio is taken against its time from
reading the file to the labels written, without its imports and weights loading (the stricter comparison).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from medseg.paths import REPO_ROOT
from medseg_client.io.studies import write_phantom
from perf.report import cmed

REAL_CT = REPO_ROOT / ".cache" / "realct" / "reference_files" / "example_ct.nii.gz"  # `make realct`
REAL_SHAPE_XYZ = (512, 512, 300)  # a typical abdominal CT's matrix and slice count


def real_ct_file(source: Path, out: Path, shape_xyz: tuple[int, int, int] = REAL_SHAPE_XYZ) -> Path:
    """A real CT resampled (trilinear, voxel centres spread over the same extent) onto ``shape_xyz`` voxels, written
    as gzipped int16 NIfTI by nibabel with the source's orientation."""
    import nibabel as nib
    from scipy import ndimage

    img: Any = nib.load(str(source))
    data = np.asarray(img.dataobj, np.float32)
    zoom = [n / m for n, m in zip(shape_xyz, data.shape, strict=True)]
    resampled = ndimage.zoom(data, zoom, order=1, mode="nearest", grid_mode=True)
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] / np.asarray(zoom)  # each voxel axis shrinks by its zoom
    # the grids share their outer edges: the first voxel's centre moves half an old voxel minus half a new one back
    affine[:3, 3] = img.affine[:3, :3] @ (0.5 / np.asarray(zoom) - 0.5) + img.affine[:3, 3]
    out_img = nib.Nifti1Image(np.rint(resampled).astype(np.int16), affine)
    out_img.set_qform(affine, code=1)
    out_img.set_sform(affine, code=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out_img, str(out))
    return out


def phantom_file(phantom: Any, folder: Path) -> Path:
    """A phantom as the NIfTI file a user would pass."""
    return write_phantom(phantom, folder, "nifti")[0]


def medseg_runs(url: str, source: Path, out: Path, repeat: int, extra: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """``repeat`` runs of ``medseg segment`` on ``source`` as new processes: each run's wall seconds and the command's
    own timings (findings.json), the process start and imports being wall - total."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "medseg_client.cli", "segment", "--url", url, *extra, str(source),
                              "--out", str(out)], capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if run.returncode not in (0, 1):
            raise SystemExit(f"medseg segment {source.name} failed ({run.returncode}): {run.stderr.strip()}")
        timings = json.loads((out / "findings.json").read_text())["timings_s"]
        runs.append({"wall_s": round(wall, 3), **timings, "start_s": round(wall - timings["total_s"], 3)})
    return runs


def monai_runs(source: Path, out: Path, repeat: int, device: str = "cpu") -> list[dict[str, float]]:
    """``repeat`` runs of the MONAI pipeline's script on ``source``: wall seconds of the process and its own split."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "perf.monai_baseline", str(source), "--out", str(out),
                              "--device", device], capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            raise SystemExit(f"MONAI pipeline on {source.name} failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
        runs.append({"wall_s": round(wall, 3), **json.loads(run.stdout.strip().splitlines()[-1])})
    return runs


def measure(url: str, files: dict[str, Path], work: Path, repeat: int, monai_repeat: int = 1,
            device: str = "cpu") -> list[dict[str, Any]]:
    """Per study file: medseg's command (one warm-up run first: the server's first study of a size grows its
    shared memory) and the MONAI pipeline's, with the ratio of their medians."""
    import nibabel as nib

    rows = []
    for name, source in files.items():
        img: Any = nib.load(str(source))
        medseg_runs(url, source, work / "warm", 1)
        runs = medseg_runs(url, source, work / f"medseg-{name}", repeat)
        monai = monai_runs(source, work / f"monai-{name}", monai_repeat, device)
        rows.append({
            "study": name, "file": source.name, "file_mb": round(source.stat().st_size / 1e6, 1),
            "shape_xyz": [int(n) for n in img.shape[:3]],
            "spacing_xyz_mm": [round(float(z), 3) for z in img.header.get_zooms()[:3]],
            "medseg": runs, "monai": monai,
            "speedup_vs_monai": round(cmed(monai, "file_to_file_s") / cmed(runs, "wall_s"), 2),
        })
    return rows
