"""Shared fixtures: the real embedded tritonserver (session-wide, free ports) and small phantoms.

``MEDSEG_TEST_FLAVOR=cuda`` (on a GPU host) makes the session's server serve the cuda flavor, so the
server tests run against it; the default is the cpu flavor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from medseg.phantom import Phantom, generate
from medseg.provenance import provenance_path
from medseg.spec import MODEL_REPOSITORY, SPEC

ONNX = MODEL_REPOSITORY / SPEC.segmenter.name / str(SPEC.segmenter.version) / "model.onnx"
# seeds never used in training (1000-1047), validation (2000-2004), the operating point (3000-3011) or the export
# check (4242); the acceptance runs on EVAL_SEEDS, quicker tests on the first three
EVAL_SEEDS = tuple(range(5002, 5010))
UNSEEN_SEEDS = EVAL_SEEDS[:3]
TEST_FLAVOR = os.environ.get("MEDSEG_TEST_FLAVOR", "cpu")
if TEST_FLAVOR not in ("cpu", "cuda"):
    raise pytest.UsageError(f"MEDSEG_TEST_FLAVOR must be cpu or cuda, got {TEST_FLAVOR!r}")


CUDA_REASON = "needs an NVIDIA GPU and a CUDA build of PyTorch (none here)"


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU here: the gpu-marked tests run only then."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def tritonserver_pid(serve_pid: int) -> int | None:
    """The tritonserver that a `medseg serve` process runs right now (None between a crash and its restart)."""
    from medseg.server import child_processes

    return next((pid for pid, name in child_processes(serve_pid) if name.startswith("tritonserver")), None)


def artifacts_missing() -> str | None:
    if not ONNX.exists() or not provenance_path(MODEL_REPOSITORY).exists():
        return "model artifacts not built: run `make artifacts`"
    return None


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real tritonserver (``TEST_FLAVOR``) on free loopback ports; readiness polled, stopped at the end."""
    from medseg.errors import ServerError
    from medseg.flavors import cuda_memory_pool_args, require_cuda
    from medseg.server import EmbeddedServer, ServerOptions

    reason = artifacts_missing()
    if reason:
        pytest.fail(reason)
    extra: list[str] = []
    if TEST_FLAVOR == "cuda":
        try:
            require_cuda()
        except ServerError as e:
            pytest.fail(f"MEDSEG_TEST_FLAVOR=cuda: {e}")
        extra = cuda_memory_pool_args()
    log = Path(tmp_path_factory.mktemp("server")) / "tritonserver.log"
    options = ServerOptions(flavor=TEST_FLAVOR, grpc_port=0, http_port=0, metrics_port=0, extra_args=extra)
    with EmbeddedServer(options, log_file=log) as s:
        yield s


@pytest.fixture(scope="session")
def small_phantom() -> Phantom:
    """A quick full-size-slice phantom (80 thick slices) for I/O tests."""
    return generate(17, num_slices=80, slice_thickness=4.0)


@pytest.fixture(scope="session")
def served_unseen(server: object) -> dict[int, tuple[Phantom, object]]:
    """The unseen phantoms of EVAL_SEEDS (full size) segmented once through the session's server, for every
    module that judges them: seed -> (phantom, SegmentationResult)."""
    from medseg_client.client import SegmentationClient

    out: dict[int, tuple[Phantom, object]] = {}
    with SegmentationClient(server.grpc_url) as client:  # type: ignore[attr-defined]
        client.wait_until_ready(60)
        for seed in EVAL_SEEDS:
            ph = generate(seed)
            out[seed] = (ph, client.segment(ph.ct, ph.spacing))
    return out


@pytest.fixture(scope="session")
def realct() -> object:
    """The real CT of `make realct` (tests/realct.py): its paths, and its labels on a study's canonical grid.
    Fails (never skips) where the cache is missing: `make test` builds it."""
    from tests.realct import cases

    return cases()
