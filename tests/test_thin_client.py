"""The thin client installs on its own: a fresh virtual environment with only ``clients/`` holds none of the
server side's heavy packages, yet its ``medseg segment`` reads a DICOM series, segments it through the real
server and writes the same results as the full project's client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medseg.accuracy.metrics import ACCEPTANCE, dice
from medseg.paths import REPO_ROOT
from medseg.synth.phantom import generate
from medseg_client.io.studies import write_phantom
from medseg_client.segment import segment_to_dir
from medseg_client.spec import SPEC
from tests.helpers import UNSEEN_SEEDS

pytestmark = pytest.mark.server

# what the client must not bring: the server side's frameworks and the server side itself (distribution names)
SERVER_ONLY = {"torch", "monai", "nvidia-dali-cuda120", "onnxruntime", "onnxruntime-gpu", "nvidia-pytriton", "medseg"}


def _run(cmd: list[str], timeout: float = 900, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with ``pip install clients/`` (not editable: what a user gets), its python."""
    venv = tmp_path_factory.mktemp("thin-client") / "venv"
    r = _run([sys.executable, "-m", "venv", str(venv)])
    assert r.returncode == 0, r.stderr
    python = venv / "bin" / "python"
    # from a copy: pip builds in the source tree (build/, *.egg-info), which must stay the checkout's own
    source = shutil.copytree(REPO_ROOT / "clients", venv.parent / "clients",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)])
    assert r.returncode == 0, r.stderr[-3000:]
    return python


def test_the_client_alone_has_none_of_the_server_sides_packages(client_venv: Path) -> None:
    listing = "import importlib.metadata as m, json; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    r = _run([str(client_venv), "-c", listing])
    assert r.returncode == 0, r.stderr
    installed = {name.lower() for name in json.loads(r.stdout)}
    assert "medseg-client" in installed and installed & SERVER_ONLY == set()
    r = _run([str(client_venv), "-c", "import medseg"], cwd=client_venv.parent)  # not the checkout's src/ either
    assert r.returncode == 1 and "No module named 'medseg'" in r.stderr


def test_the_clients_medseg_command_has_the_client_commands_only(client_venv: Path) -> None:
    medseg = client_venv.parent / "medseg"
    r = _run([str(medseg), "--help"])
    assert r.returncode == 0 and "{segment,models}" in r.stdout, r.stdout + r.stderr  # no server-side command
    r = _run([str(medseg), "serve"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "invalid choice: 'serve'" in r.stderr, r.stderr


def test_the_thin_client_segments_a_dicom_series_as_the_full_client_does(
        server: Any, client_venv: Path, tmp_path: Path) -> None:
    ph = generate(UNSEEN_SEEDS[1], num_slices=80, slice_thickness=4.0)
    write_phantom(ph, tmp_path / "study", "dicom")
    series = tmp_path / "study" / "dicom"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = _run([str(client_venv.parent / "medseg"), "segment", "--url", server.grpc_url, str(series),
              "--out", str(tmp_path / "thin")], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    thin = tmp_path / "thin"
    assert {p.name for p in thin.iterdir()} >= {"labels.nii.gz", "findings.json", "seg.dcm", "preview.png"}

    # the same study through the full project's client, in this process
    segment_to_dir(server.grpc_url, series, tmp_path / "full", SPEC.ensemble.name, 300.0)
    labels = np.asanyarray(nib.load(str(thin / "labels.nii.gz")).dataobj)
    np.testing.assert_array_equal(labels, np.asanyarray(nib.load(str(tmp_path / "full" / "labels.nii.gz")).dataobj))
    truth = np.asanyarray(nib.load(str(tmp_path / "study" / "labels_truth.nii.gz")).dataobj)
    assert dice(labels > 0, truth > 0) >= ACCEPTANCE.liver_dice
    thin_doc, full_doc = (json.loads((tmp_path / d / "findings.json").read_text())["findings"] for d in ("thin", "full"))
    assert thin_doc == full_doc
