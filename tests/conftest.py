"""Shared fixtures: the real embedded tritonserver (session-wide, free ports) and small phantoms.

``MEDSEG_TEST_FLAVOR=cuda`` (on a GPU host) makes the session's server serve the cuda flavor, so the
server tests run against it; the default is the cpu flavor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from medseg.synth.phantom import Phantom, generate
from tests.helpers import EVAL_SEEDS, TEST_FLAVOR, artifacts_missing


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real tritonserver (``TEST_FLAVOR``) on free loopback ports; readiness polled, stopped at the end."""
    from medseg.serving.flavors import cuda_memory_pool_args, require_cuda
    from medseg.serving.server import EmbeddedServer, ServerOptions
    from medseg_client.errors import ServerError

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
