"""Fuzzing the study reader: mutated phantom slices and pydicom's own test files.

Every case must be read or refused with a StudyError, within a time limit, in a worker whose
address space is capped: 0 crashes (any other exception, or a dead worker), 0 hangs. A sample runs
in the default suite; the full 1,000+ cases in the slow suite.
"""

from __future__ import annotations

import concurrent.futures as cf
import resource
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from medseg.phantom import Phantom
from medseg.studies import write_dicom_series

CASE_TIMEOUT_S = 20.0
MEMORY_CAP = 4 * 1024**3  # bytes of address space for the worker
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
MUTATIONS = ("truncate", "flip_bytes", "bad_length", "wrong_vr", "absurd_rows", "absurd_frames",
             "drop_pixels", "drop_position", "swap_in_test_file", "non_image", "bad_spacing", "zero_bytes")


def _tiny_series(folder: Path, slices: int = 6, size: int = 32,
                 spacing: tuple[float, float, float] = (2.0, 0.8, 0.8)) -> list[Path]:
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1000, size=(slices, size, size)).astype(np.int16)
    ph = Phantom(seed=0, ct=ct, labels=np.zeros_like(ct, np.uint8), spacing=spacing, origin_mm=(0.0, 0.0, 0.0))
    return write_dicom_series(ph, folder)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _read(folder: str) -> str:
    """Worker: 'read <shape>' or 'refused: <reason>'; any other exception propagates as a crash."""
    from medseg.errors import StudyError
    from medseg.studies import read_study

    try:
        study = read_study(Path(folder))
    except StudyError as e:
        return f"refused: {e}"
    return f"read {study.ct.shape}"


@dataclass
class Case:
    seed: int
    mutation: str


def _mutate(case: Case, folder: Path, **series: Any) -> None:
    """Write a tiny series into ``folder`` (``series``: _tiny_series' size) and damage it as ``case`` says."""
    rng = np.random.default_rng(case.seed)
    files = _tiny_series(folder, **series)
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


def _run(cases: list[Case]) -> dict[str, int]:
    outcomes = {"read": 0, "refused": 0}
    crashes, hangs = [], []
    pool = cf.ProcessPoolExecutor(max_workers=1, initializer=_limit_memory)
    try:
        for case in cases:
            folder = Path(tempfile.mkdtemp(prefix="medseg-fuzz-"))
            try:
                _mutate(case, folder)
                try:
                    result = pool.submit(_read, str(folder)).result(timeout=CASE_TIMEOUT_S)
                    outcomes["read" if result.startswith("read") else "refused"] += 1
                except cf.TimeoutError:
                    hangs.append(case)
                    pool.shutdown(wait=False, cancel_futures=True)
                    for p in list(getattr(pool, "_processes", {}).values()):
                        p.kill()
                    pool = cf.ProcessPoolExecutor(max_workers=1, initializer=_limit_memory)
                except cf.process.BrokenProcessPool:
                    crashes.append((case, "worker died"))
                    pool = cf.ProcessPoolExecutor(max_workers=1, initializer=_limit_memory)
                except Exception as e:  # anything but a StudyError is a crash of the reader
                    crashes.append((case, f"{type(e).__name__}: {e}"))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    assert crashes == [], f"{len(crashes)} crash(es): {crashes[:5]}"
    assert hangs == [], f"{len(hangs)} hang(s): {hangs[:5]}"
    return outcomes


def _cases(n: int) -> list[Case]:
    return [Case(seed=i, mutation=MUTATIONS[i % len(MUTATIONS)]) for i in range(n)]


def test_a_sample_of_damaged_series_is_read_or_refused_never_crashes() -> None:
    outcomes = _run(_cases(60))
    assert outcomes["refused"] > 0 and outcomes["read"] + outcomes["refused"] == 60


def test_every_pydicom_test_file_beside_a_series_is_read_or_refused(tmp_path: Path) -> None:
    cases = []
    for i, _name in enumerate(sorted(TEST_FILES.glob("*.dcm"))):
        cases.append(Case(seed=10_000 + i, mutation="swap_in_test_file"))
    _run(cases)


@pytest.mark.slow
def test_a_thousand_damaged_series_are_read_or_refused_never_crash() -> None:
    outcomes = _run(_cases(1200))
    assert outcomes["read"] + outcomes["refused"] == 1200
