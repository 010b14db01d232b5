"""Hardened serving: `medseg serve` starts with no model control, no HTTP, the admin APIs closed behind
a key (health, metadata and inference open), and gRPC over TLS with one flag: plaintext and wrong-CA
clients are refused."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from medseg.serving.server import EmbeddedServer, ServerOptions, Tls, child_processes, free_port
from medseg_client.protocol import ADMIN_GRPC_HEADER
from medseg_client.spec import SPEC
from tests.helpers import ServeProcess, served_count, tritonserver_pid, wait_until

pytestmark = pytest.mark.server


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_medseg_serve_is_hardened_by_default_and_stops_on_sigterm() -> None:
    import tritonclient.grpc as grpcclient

    http_port = free_port()
    key = secrets.token_urlsafe(18)
    with ServeProcess("--http-port", str(http_port), env={"MEDSEG_ADMIN_KEY": key}) as serve:
        serve.wait_ready()
        with grpcclient.InferenceServerClient(serve.url) as client:
            assert not _listening(http_port), "HTTP must be off unless asked for"
            assert client.get_model_metadata(SPEC.ensemble.name)  # metadata and inference stay open
            for closed in (client.get_inference_statistics, client.get_model_repository_index,
                           client.get_system_shared_memory_status, client.get_log_settings, client.get_trace_settings):
                with pytest.raises(Exception, match="restricted"):
                    closed()
            with pytest.raises(Exception, match="restricted"):
                client.unload_model(SPEC.ensemble.name)
            assert client.get_inference_statistics(headers={ADMIN_GRPC_HEADER: key}, as_json=True)["model_stats"]
            with pytest.raises(Exception, match=r"(?i)explicit|poll|not allowed|unsupported"):
                client.unload_model(SPEC.ensemble.name, headers={ADMIN_GRPC_HEADER: key})  # model control is off
            assert client.is_model_ready(SPEC.ensemble.name)
        assert serve.stop(signal.SIGTERM) == 0, serve.output
        assert "stopped" in serve.output and key not in serve.output, "the admin key is never printed"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN=medseg test {name}", cwd=cwd)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate it signed for 127.0.0.1/localhost, and an unrelated CA."""
    d = tmp_path_factory.mktemp("tls")
    _ca("ca", d)
    _ca("other-ca", d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


def test_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext_and_other_cas(certificates: Path) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from medseg.synth.phantom import generate
    from medseg_client.client import SegmentationClient

    d = certificates
    tls = Tls(d / "server.pem", d / "server.key", d / "ca.pem")
    with EmbeddedServer(ServerOptions(grpc_port=0, metrics_port=0, tls=tls, admin_key=secrets.token_hex(8))) as server:
        ph = generate(5004, num_slices=24, slice_thickness=8.0)
        with SegmentationClient(server.grpc_url, tls_ca=d / "ca.pem") as client:
            assert client.segment(ph.ct, ph.spacing).labels.shape == ph.ct.shape
        plain = grpcclient.InferenceServerClient(server.grpc_url)
        other = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(d / "other-ca.pem"))
        for refused in (plain, other):  # the handshake never completes: no channel, no call
            with pytest.raises(InferenceServerException) as e:
                refused.is_server_live(client_timeout=5)
            assert "UNAVAILABLE" in str(e.value.status()) or "DEADLINE" in str(e.value.status())


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_crashed_model_process_fails_its_request_fast_and_serve_restarts_the_server() -> None:
    from medseg.synth.phantom import generate
    from medseg_client.client import SegmentationClient
    from medseg_client.errors import MedsegError

    key = secrets.token_hex(16)  # the key opens the statistics the test waits on
    with ServeProcess(env={"MEDSEG_ADMIN_KEY": key}) as serve:
        url = serve.url
        with SegmentationClient(url, timeout_s=120) as client:
            client.wait_until_ready(120)
            ph = generate(5004, num_slices=200, slice_thickness=1.5)
            outcome: dict[str, object] = {}

            def request() -> None:
                t0 = time.monotonic()
                try:
                    outcome["result"] = client.segment(ph.ct, ph.spacing)
                except MedsegError as e:
                    outcome["error"] = e
                outcome["seconds"] = time.monotonic() - t0

            preprocessed = served_count(url, SPEC.preprocess.name, headers={ADMIN_GRPC_HEADER: key})
            worker = threading.Thread(target=request)
            worker.start()
            # the study is past its preprocessing: in the segmenter now (seconds of work for 200 slices here)
            wait_until(lambda: served_count(url, SPEC.preprocess.name, headers={ADMIN_GRPC_HEADER: key}) > preprocessed,
                       "the study preprocessed")
            server_pid = tritonserver_pid(serve.pid)
            assert server_pid is not None
            segmenter = next(p for p, _ in child_processes(server_pid) if "ct_segmenter" in _cmdline(p))
            os.kill(segmenter, signal.SIGKILL)
            worker.join(60)
            assert not worker.is_alive(), "the request hung after its model process died"
            assert "error" in outcome, "a request whose model process died cannot have a result"
            print(f"failed after {outcome['seconds']:.1f} s: {outcome['error']}")
        # Triton still says "ready" with a dead stub: medseg serve notices, restarts it and says so
        serve.wait_for_line("restarted and ready", timeout_s=180)
        assert "restarting the server" in serve.output, serve.output
        with SegmentationClient(url, timeout_s=120) as client:
            client.wait_until_ready(60)
            assert client.segment(*_small(ph)).labels.shape == _small(ph)[0].shape


def _small(ph: object) -> tuple[object, tuple[float, float, float]]:
    ct, spacing = ph.ct, ph.spacing  # type: ignore[attr-defined]
    return ct[::4], (spacing[0] * 4, spacing[1], spacing[2])
