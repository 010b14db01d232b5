"""Test helper: the same phantom anatomy stored as DICOM series in other ways.

Re-oriented variants keep every voxel centre in the same place in patient space; only the storage
order, ImageOrientationPatient and ImagePositionPatient change, as a scanner or PACS export might.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom

from medseg.phantom import Phantom
from medseg.studies import write_dicom_series


def _restore(ph: Phantom, folder: Path, frames: np.ndarray, iop: list[float], positions: np.ndarray,
             spacing_rc: tuple[float, float], thickness: float) -> None:
    """Rewrite ``folder`` as one file per frame of ``frames`` (k, rows, cols) with the given geometry."""
    template = pydicom.dcmread(next(iter(sorted(folder.iterdir()))))
    shutil.rmtree(folder)
    folder.mkdir()
    for k, frame in enumerate(frames):
        ds = template.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(ph.seed), "variant", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = frame.shape
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
        ds.PixelSpacing = [f"{spacing_rc[0]:.6g}", f"{spacing_rc[1]:.6g}"]
        ds.SliceThickness = f"{thickness:.6g}"
        ds.PixelData = (frame.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm")


def tilt_rows(volume: np.ndarray, fill: int) -> np.ndarray:
    """Slice k shifted up by k rows: what a gantry tilt of atan(row spacing / slice spacing) acquires."""
    out = np.full_like(volume, fill)
    for k in range(volume.shape[0]):
        out[k, : volume.shape[1] - k] = volume[k, k:]
    return out


def write_variant(ph: Phantom, folder: Path, variant: str) -> None:
    """Write ``ph`` into ``folder`` as ``variant``: axial, flipped (rows, columns and slice order
    reversed), tilted (gantry tilt: slice k shifted k rows in-plane), oblique (planes rotated 10 degrees)
    or sagittal (re-stacked along x)."""
    write_dicom_series(ph, folder)
    if variant == "axial":
        return
    sz, sy, sx = ph.spacing
    ox, oy, oz = ph.origin_mm
    nz, ny, nx = ph.ct.shape
    if variant == "flipped":
        frames = ph.ct[::-1, ::-1, ::-1]
        positions = np.array([[ox + (nx - 1) * sx, oy + (ny - 1) * sy, oz + (nz - 1 - k) * sz] for k in range(nz)])
        _restore(ph, folder, frames, [-1, 0, 0, 0, -1, 0], positions, (sy, sx), sz)
    elif variant == "tilted":
        frames = tilt_rows(ph.ct, -1000)
        positions = np.array([[ox, oy + k * sy, oz + k * sz] for k in range(nz)])
        _restore(ph, folder, frames, [1, 0, 0, 0, 1, 0], positions, (sy, sx), sz)
    elif variant == "oblique":  # the same pixels on planes rotated 10 degrees about the slice normal
        a = np.radians(10)
        row, col = np.array([np.cos(a), np.sin(a), 0.0]), np.array([-np.sin(a), np.cos(a), 0.0])
        positions = np.array([[ox, oy, oz + k * sz] for k in range(nz)])
        _restore(ph, folder, ph.ct, [*row.round(6), *col.round(6)], positions, (sy, sx), sz)
    elif variant == "sagittal":
        # frame k = the plane x = k; rows run from head to feet (-z), columns along +y
        frames = np.ascontiguousarray(ph.ct[::-1].transpose(2, 0, 1))
        positions = np.array([[ox + k * sx, oy, oz + (nz - 1) * sz] for k in range(nx)])
        _restore(ph, folder, frames, [0, 1, 0, 0, 0, -1], positions, (sz, sy), sx)
    else:
        raise ValueError(f"unknown variant {variant!r}")
