"""Shared fixtures: the real embedded tritonserver (session-wide, free ports) and small phantoms."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from medseg.phantom import Phantom, generate
from medseg.provenance import provenance_path
from medseg.spec import MODEL_REPOSITORY, SPEC

ONNX = MODEL_REPOSITORY / SPEC.segmenter.name / str(SPEC.segmenter.version) / "model.onnx"
# seeds never used in training (1000-1031), validation (2000-2002) or the export check (4242)
UNSEEN_SEEDS = (5002, 5003, 5004)


def artifacts_missing() -> str | None:
    if not ONNX.exists() or not provenance_path(MODEL_REPOSITORY).exists():
        return "model artifacts not built: run `make artifacts`"
    return None


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real tritonserver (cpu flavor) on free loopback ports; readiness polled, stopped at the end."""
    from medseg.server import EmbeddedServer, ServerOptions

    reason = artifacts_missing()
    if reason:
        pytest.fail(reason)
    log = Path(tmp_path_factory.mktemp("server")) / "tritonserver.log"
    with EmbeddedServer(ServerOptions(grpc_port=0, http_port=0, metrics_port=0), log_file=log) as s:
        yield s


@pytest.fixture(scope="session")
def small_phantom() -> Phantom:
    """A quick full-size-slice phantom (80 thick slices) for I/O tests."""
    return generate(17, num_slices=80, slice_thickness=4.0)
