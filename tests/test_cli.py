"""The medseg command: one clear line and a non-zero exit on bad input, nothing half written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MEDSEG = [sys.executable, "-m", "medseg_client.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEDSEG, *args], capture_output=True, text=True, timeout=300)


def test_phantom_writes_a_dicom_series_and_its_truth(tmp_path: Path) -> None:
    r = run("phantom", "--seed", "3", "--out", str(tmp_path), "--slices", "80")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "dicom").glob("*.dcm"))) == 80
    assert (tmp_path / "labels_truth.nii.gz").exists() and (tmp_path / "phantom.json").exists()


def test_segment_of_a_missing_input_fails_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run("segment", "--url", "127.0.0.1:1", str(tmp_path / "nope"), "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such file or folder" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_segment_with_no_server_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    run("phantom", "--seed", "3", "--out", str(tmp_path / "s"), "--slices", "80", "--format", "nifti")
    out = tmp_path / "out"
    r = run("segment", "--url", "127.0.0.1:1", "--timeout", "5", str(tmp_path / "s" / "ct.nii.gz"), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert "unavailable" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".medseg-*"))


def test_serve_cuda_without_a_gpu_says_why_in_one_line() -> None:
    from medseg.serving.flavors import require_cuda
    from medseg_client.errors import ServerError

    try:
        require_cuda()
    except ServerError:
        pass
    else:
        pytest.skip("this machine has a GPU: the refusal cannot be shown")
    r = run("serve", "--flavor", "cuda", "--grpc-port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "CUDA device" in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(("given", "kind"), [(True, "system"), ("system", "system"), ("cuda", "cuda:0"),
                                             ("cuda:1", "cuda:1"), (False, None), (None, None)])
def test_shared_memory_kinds_are_named(given: bool | str | None, kind: str | None) -> None:
    from medseg_client.protocol import shared_memory_kind

    assert shared_memory_kind(given) == kind


def test_an_unknown_shared_memory_kind_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run("segment", "--url", "127.0.0.1:1", str(tmp_path / "nope"), "--out", str(out), "--shared-memory", "gpu")
    assert r.returncode == 2 and "shared memory must be system, cuda or cuda:<device>, got 'gpu'" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
