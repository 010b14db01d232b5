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
from pathlib import Path

import pytest

from tests.series_variants import MUTATIONS, TEST_FILES, Case, mutate

CASE_TIMEOUT_S = 20.0
MEMORY_CAP = 4 * 1024**3  # bytes of address space for the worker
def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _read(folder: str) -> str:
    """Worker: 'read <shape>' or 'refused: <reason>'; any other exception propagates as a crash."""
    from medseg_client.errors import StudyError
    from medseg_client.io.studies import read_study

    try:
        study = read_study(Path(folder))
    except StudyError as e:
        return f"refused: {e}"
    return f"read {study.ct.shape}"


def _run(cases: list[Case]) -> dict[str, int]:
    outcomes = {"read": 0, "refused": 0}
    crashes, hangs = [], []
    pool = cf.ProcessPoolExecutor(max_workers=1, initializer=_limit_memory)
    try:
        for case in cases:
            folder = Path(tempfile.mkdtemp(prefix="medseg-fuzz-"))
            try:
                mutate(case, folder)
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
