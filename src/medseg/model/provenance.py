"""Which model produced a result (name, version, spec version, weights and ONNX sha256) and on what machine.

The export step writes it beside the ONNX model; the postprocess model stamps it on every result; reports of
measurements name the CPU they ran on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medseg_client.errors import ArtifactError
from medseg_client.spec import SPEC

FILENAME = "provenance.json"


def provenance_path(model_repository: Path) -> Path:
    return model_repository / SPEC.segmenter.name / str(SPEC.segmenter.version) / FILENAME


def read_provenance(model_repository: Path) -> dict[str, Any]:
    """The provenance record of the repository's segmenter; refuses a missing one."""
    path = provenance_path(model_repository)
    if not path.exists():
        raise ArtifactError(f"{path} is missing: run `make artifacts` to export the model")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it ("" where it does not)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
