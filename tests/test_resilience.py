"""Client resilience: retries happen only for a server that is unreachable, too slow or still loading
its models, never for a refused study or a server-side failure; a batch of studies survives the
server being killed 20 times under it, `medseg serve` restarting it each time."""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg_client.errors import MedsegError, StudyError
from medseg_client.spec import SPEC
from tests.helpers import ServeProcess, served_count, tritonserver_pid, wait_until


@pytest.mark.parametrize(("status", "message", "retried"), [
    ("StatusCode.UNAVAILABLE", "failed to connect", True), ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", True),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'ct_liver' has no available versions", True),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'other' is not found", False),
    ("StatusCode.INVALID_ARGUMENT", "CT volume must be 3-D", False), ("StatusCode.INTERNAL", "Stub process is not healthy", False),
])
def test_only_an_unreachable_slow_or_loading_server_is_retried(status: str, message: str, retried: bool) -> None:
    from tritonclient.utils import InferenceServerException

    from medseg_client.client import ServerUnavailableError, _raise_from

    with pytest.raises(MedsegError) as e:
        _raise_from(InferenceServerException(message, status=status), "segmenting")
    assert isinstance(e.value, ServerUnavailableError) == retried
    assert isinstance(e.value, StudyError) == (status == "StatusCode.INVALID_ARGUMENT")


@pytest.mark.server
@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shared-memory"])
def test_a_cancelled_study_stops_at_once_leaves_nothing_and_the_next_is_served(server: Any, shared_memory: bool) -> None:
    import tritonclient.grpc as grpcclient

    from medseg.synth.phantom import generate
    from medseg_client.client import CancelledError, SegmentationClient

    big = generate(5004, num_slices=240, slice_thickness=1.25)  # seconds of work on this machine
    small = generate(5002, num_slices=20, slice_thickness=5.0)
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def cancel_in_flight() -> None:  # once the study is past preprocessing, in the segmenter (seconds of work)
        wait_until(lambda: served_count(server.grpc_url, SPEC.preprocess.name) > preprocessed, "the study preprocessed")
        cancelled_at.append(time.monotonic())
        cancel.set()

    with SegmentationClient(server.grpc_url, shared_memory=shared_memory) as client:
        preprocessed = served_count(server.grpc_url, SPEC.preprocess.name)
        canceller = threading.Thread(target=cancel_in_flight, daemon=True)
        canceller.start()
        with pytest.raises(CancelledError, match="cancelled by the caller"):
            client.segment(big.ct, big.spacing, cancel=cancel)
        waited = time.monotonic() - cancelled_at[0]
        with pytest.raises(CancelledError):  # an event already set: nothing is sent
            client.segment(small.ct, small.spacing, cancel=cancel)
        assert client.segment(small.ct, small.spacing).labels.shape == small.ct.shape
        # Triton refuses to unregister a region the cancelled request still uses: the client lets go later
        status = grpcclient.InferenceServerClient(server.grpc_url)
        wait_until(lambda: not [n for n in status.get_system_shared_memory_status(as_json=True).get("regions", {})
                                if n.startswith(f"medseg-{os.getpid()}-")], "the client's regions unregistered")
    assert waited < 2.0, f"cancelling took {waited:.1f} s"
    assert not list(Path("/dev/shm").glob(f"medseg-{os.getpid()}-*"))
    assert server.ready()


@pytest.mark.server
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("kills_wanted", "min_studies"), [(6, 12), pytest.param(20, 30, marks=pytest.mark.slow)])
def test_a_batch_survives_server_kills_every_study_ending_once_right_or_with_a_clear_error(kills_wanted: int,
                                                                                          min_studies: int) -> None:
    """`medseg serve` on fixed ports; a killer SIGKILLs its tritonserver (with the model processes) 6 times (20 in
    the slow suite), each a moment into a study, while one client segments studies in a loop."""
    from medseg.synth.phantom import generate
    from medseg_client.client import SegmentationClient
    from medseg_client.errors import MedsegError

    serve = ServeProcess()
    url = serve.url
    studies = [generate(seed, num_slices=n, slice_thickness=5.0) for seed, n in ((5002, 20), (5003, 26), (5004, 32))]
    kills: list[float] = []
    stop = threading.Event()

    outcomes: list[tuple[int, str, object]] = []  # (study, "result" | "error", labels | message), one per submission

    def killer() -> None:
        """Each kill a moment into a study, after the restarted server has finished one: kills spread over studies."""
        rng = random.Random(7)
        while len(kills) < kills_wanted and not stop.is_set():
            seen = len(outcomes)
            while len(outcomes) == seen and not stop.is_set():  # the server is back and has served a study
                time.sleep(0.02)
            # a random moment into the next study (the client sends it at once): kills land at every stage of it;
            # whatever stage a kill meets, every study must still end once, right or with a clear error
            time.sleep(rng.uniform(0.05, 0.4))
            pid = tritonserver_pid(serve.pid)
            if pid is not None:
                os.killpg(pid, signal.SIGKILL)
                kills.append(time.monotonic())
                while tritonserver_pid(serve.pid) == pid and not stop.is_set():  # until serve has reaped it
                    time.sleep(0.02)

    try:
        with SegmentationClient(url, timeout_s=60, retries=12, backoff_s=0.25) as client:
            client.wait_until_ready(120)
            alone = [client.segment(ph.ct, ph.spacing).labels for ph in studies]
            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            t0 = time.monotonic()
            for n in itertools.count():
                if n >= min_studies and (len(kills) >= kills_wanted or time.monotonic() - t0 > 600):
                    break
                i = n % len(studies)
                try:
                    result = client.segment(studies[i].ct, studies[i].spacing)
                    outcomes.append((i, "result", (result.labels, result.attempts)))
                except MedsegError as e:
                    outcomes.append((i, "error", str(e)))
            stop.set()
            thread.join(30)
    finally:
        stop.set()
        serve.stop()
    lines = serve.lines
    results = [(i, v) for i, kind, v in outcomes if kind == "result"]
    errors = [str(v) for _, kind, v in outcomes if kind == "error"]
    wrong = [i for i, (labels, _) in results if not np.array_equal(labels, alone[i])]  # type: ignore[misc]
    retried = sum(1 for _, (_, attempts) in results if attempts > 1)  # type: ignore[misc]
    extra_attempts = sum(attempts - 1 for _, (_, attempts) in results)  # type: ignore[misc]
    restarts = sum("restarting" in line or "failed to start" in line for line in lines)
    print(f"{len(outcomes)} studies, {len(kills)} kills, {restarts} restarts by medseg serve: {len(results)} results "
          f"({retried} after retries, {extra_attempts} retries in all), {len(errors)} errors, "
          f"{len(wrong)} wrong; errors: {errors[:3]}")
    assert len(kills) == kills_wanted, f"only {len(kills)} kills happened"
    assert restarts >= kills_wanted, "".join(lines[-30:])
    assert wrong == [], "a result that differs from the study's own labels"
    assert len(outcomes) >= min_studies and {i for i, _, _ in outcomes} == set(range(len(studies)))
    assert all(url in e for e in errors), errors  # a clear error names the server it could not use
    assert len(errors) <= len(outcomes) // 5, errors
    assert retried >= kills_wanted // 2, "the kills must have hit requests in flight"
    assert outcomes[-1][1] == "result", "the server must be serving again at the end"
    leaked = [p.name for p in Path("/dev/shm").glob(f"medseg_{serve.pid}_*")]
    assert leaked == [], f"shared memory of killed servers left behind: {leaked}"


def test_a_server_that_never_answers_ends_in_a_clear_error_within_the_deadlines() -> None:
    """Every call has a deadline: a listener that accepts and never speaks cannot hang the client."""
    import socket

    from medseg.synth.phantom import generate
    from medseg_client.client import SegmentationClient, ServerUnavailableError

    ph = generate(5002, num_slices=8, slice_thickness=5.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"127.0.0.1:{silent.getsockname()[1]}"
        with SegmentationClient(url, timeout_s=1.0, retries=2, backoff_s=0.1) as client:
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailableError, match=rf"{url}.*gave up after 3 attempts"):
                client.segment(ph.ct, ph.spacing)
            waited = time.monotonic() - t0
    assert waited < 10.0, f"{waited:.1f} s"
