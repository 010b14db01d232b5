"""Test helper: the same phantom anatomy stored as DICOM series in other ways.

Re-oriented variants keep every voxel centre in the same place in patient space; only the storage
order, ImageOrientationPatient and ImagePositionPatient change, as a scanner or PACS export might.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medseg.synth.phantom import Phantom
from medseg_client.io.studies import write_dicom_series

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # pydicom's own test files


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


# Damaged series: a tiny random-valued series with one file broken in one of MUTATIONS' ways (the reader fuzz
# and the no-traceback runs)
MUTATIONS = ("truncate", "flip_bytes", "bad_length", "wrong_vr", "absurd_rows", "absurd_frames",
             "drop_pixels", "drop_position", "swap_in_test_file", "non_image", "bad_spacing", "zero_bytes")


def tiny_series(folder: Path, slices: int = 6, size: int = 32,
                spacing: tuple[float, float, float] = (2.0, 0.8, 0.8)) -> list[Path]:
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1000, size=(slices, size, size)).astype(np.int16)
    ph = Phantom(seed=0, ct=ct, labels=np.zeros_like(ct, np.uint8), spacing=spacing, origin_mm=(0.0, 0.0, 0.0))
    return write_dicom_series(ph, folder)


@dataclass
class Case:
    seed: int
    mutation: str


def mutate(case: Case, folder: Path, **series: Any) -> None:
    """Write a tiny series into ``folder`` (``series``: tiny_series' size) and damage it as ``case`` says."""
    rng = np.random.default_rng(case.seed)
    files = tiny_series(folder, **series)
    victim = files[int(rng.integers(len(files)))]
    raw = bytearray(victim.read_bytes())
    m = case.mutation
    if m == "truncate":
        victim.write_bytes(bytes(raw[: int(rng.integers(0, len(raw)))]))
    elif m == "flip_bytes":
        for _ in range(int(rng.integers(1, 40))):
            raw[int(rng.integers(128, len(raw)))] = int(rng.integers(256))
        victim.write_bytes(bytes(raw))
    elif m == "zero_bytes":
        start = int(rng.integers(128, len(raw)))
        raw[start : start + int(rng.integers(1, 400))] = b"\0" * len(raw[start : start + 400])
        victim.write_bytes(bytes(raw))
    elif m == "bad_length":  # corrupt a 4-byte length field after an explicit VR
        pos = [i for i in range(132, min(len(raw), 2000) - 8) if raw[i : i + 2] in (b"OW", b"OB", b"SQ", b"UN")]
        if pos:
            i = pos[int(rng.integers(len(pos)))]
            raw[i + 4 : i + 8] = int(rng.integers(0, 2**32)).to_bytes(4, "little")
        else:
            raw[140:144] = b"\xff\xff\xff\x7f"
        victim.write_bytes(bytes(raw))
    else:
        ds = pydicom.dcmread(victim)
        if m == "wrong_vr":  # Rows written as text with the wrong VR
            del ds.Rows
            ds.add_new(0x00280010, "LO", "abc" if rng.random() < 0.5 else "-3")
        elif m == "absurd_rows":
            ds.Rows = int(rng.choice([0, 1, 65535]))
            ds.Columns = int(rng.choice([0, 7, 65535]))
        elif m == "absurd_frames":
            ds.NumberOfFrames = int(rng.choice([0, 2, 10**6]))
        elif m == "drop_pixels":
            del ds.PixelData
        elif m == "drop_position":
            del ds.ImagePositionPatient
        elif m == "bad_spacing":
            ds.PixelSpacing = [str(rng.choice(["0", "-1", "nan", "inf"])), "0.8"]
            for f in files:
                other = pydicom.dcmread(f)
                other.PixelSpacing = ds.PixelSpacing
                other.save_as(f)
        elif m == "non_image":
            victim.unlink()
            shutil.copy(TEST_FILES / str(rng.choice(["rtplan.dcm", "rtstruct.dcm", "reportsi.dcm"])), folder / "x.dcm")
            return
        elif m == "swap_in_test_file":
            names = sorted(p.name for p in TEST_FILES.glob("*.dcm"))
            shutil.copy(TEST_FILES / str(rng.choice(names)), victim)
            return
        try:
            ds.save_as(victim)
        except Exception:
            victim.write_bytes(bytes(raw[: len(raw) // 2]))
