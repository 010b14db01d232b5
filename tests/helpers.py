"""Helpers shared by the tests: wait for what a test needs to have happened (never for a fixed time), and the
DICOM validator as an oracle (a test that needs it is marked, and skipped with the reason where it is missing)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

POLL_S = 0.02  # between two looks at the state waited for


def wait_until(look: Callable[[], T], what: str, timeout_s: float = 60.0) -> T:
    """Poll ``look`` until it returns something true, and return that; AssertionError naming ``what`` when it has
    not happened within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = look()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(POLL_S)


def served_count(url: str, model: str, headers: dict[str, str] | None = None) -> int:
    """How many requests ``model`` of the Triton server at ``url`` has completed successfully."""
    import tritonclient.grpc as grpcclient
    from medseg_client.client import model_statistics

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model, headers=headers, as_json=True)
    return int(model_statistics(stats)[model]["count"])


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of the DICOM validator (dicom3tools) on ``path``."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                    reason="dciodvfy not installed (Debian dicom3tools; `make sysdeps`)")
