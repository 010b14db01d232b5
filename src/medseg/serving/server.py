"""The embedded Triton Inference Server: the real ``tritonserver`` shipped inside the nvidia-pytriton wheel.

It runs on a CPU-only machine with the python backend and ensembles; ``--model-config-name`` picks
the flavor (``cpu`` by default; ``cuda`` on a GPU host). Readiness is polled over gRPC, never waited
for by a fixed sleep. Hardening is in the options: no model control, HTTP only when asked, the admin
protocols behind a key, gRPC over TLS.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from threading import Thread
from types import TracebackType
from typing import Any, TextIO

from medseg.paths import MODEL_REPOSITORY, REPO_ROOT
from medseg_client.errors import ServerError
from medseg_client.protocol import ADMIN_KEY_NAME, ADMIN_PROTOCOLS, GRPC_PORT, HTTP_PORT, METRICS_PORT

BACKENDS_DIR = REPO_ROOT / ".triton_backends"
# the python backend's shared memory (start and growth step) per model instance, in /dev/shm (RAM). Embedded: the
# python models pass CPU tensors (the image, float32 logits, the CT) through it: each starts at 128 MiB and grows by
# 1 GiB at a time on its first large study (a whole-volume 512 x 512 x 300 study needs about 1 GiB), so a repository
# of many models (each imported model adds three) does not hold a GiB per model it may never use. GPU production
# (docker-compose.yml, medseg mig compose): only the postprocess is python, its logits come by CUDA IPC and only the
# CT and the labels pass here, inside the container's 2 GB /dev/shm: 64 MiB steps.
SHM_START_BYTES = 128 * 1024 * 1024
SHM_GROWTH_BYTES = 1024 * 1024 * 1024
PRODUCTION_SHM_BYTES = 64 * 1024 * 1024


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def tritonserver_binary() -> tuple[Path, Path]:
    """(binary, library dir) of the tritonserver inside the nvidia-pytriton wheel."""
    site = _site_packages()
    binary = site / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    libs = site / "nvidia_pytriton.libs"
    if not binary.exists():
        raise ServerError(f"tritonserver not found at {binary}: install the nvidia-pytriton wheel (`make venv`)")
    return binary, libs


def python_backend_dir() -> Path:
    """A backend directory holding the python backend with the stub for this Python version."""
    site = _site_packages() / "pytriton" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = site / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"no python backend stub for Python {version} in {stub.parent.parent}")
    target = BACKENDS_DIR / "python"
    marker = target / ".source"
    source = f"{site}:{version}"
    if not (marker.exists() and marker.read_text() == source):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(site / "backends" / "python", target, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, target / "triton_python_backend_stub")
        marker.write_text(source)
    return BACKENDS_DIR


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM it when the thread that started it dies, even by SIGKILL or OOM
    (Linux ``PR_SET_PDEATHSIG``), so a killed client never leaves a server and its stubs holding memory."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def child_processes(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the live children of ``pid``, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone while listing
            continue
        name_end = text.rfind(")")
        fields = text[name_end + 2 :].split()  # state, ppid, ...
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] not in ("Z", "X"):  # a dead child is gone
            out.append((int(stat.parent.name), text[text.find("(") + 1 : name_end]))
    return out


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




@dataclass(frozen=True)
class Tls:
    """gRPC over TLS: the server's certificate chain and key (PEM); ``ca`` verifies it for readiness polls."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class ServerOptions:
    """How to start the server; ports of 0 are chosen free at start (on the server's own copy)."""

    flavor: str = "cpu"
    grpc_port: int = GRPC_PORT
    http_port: int = HTTP_PORT
    metrics_port: int = METRICS_PORT
    address: str = "127.0.0.1"
    model_repository: Path = MODEL_REPOSITORY
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    models: tuple[str, ...] = ()  # load only these (explicit model control); () loads the whole repository
    cpus: str | None = None  # pin the server and its model processes to these cores (taskset list, e.g. "0")
    http: bool = False  # the HTTP endpoint only when asked; readiness is polled over gRPC
    admin_key: str | None = None  # close ADMIN_PROTOCOLS behind this key
    tls: Tls | None = None  # gRPC over TLS


class EmbeddedServer:
    """Start, wait for and stop the real tritonserver; a context manager. Restarts are `supervisor.Supervisor`'s."""

    def __init__(self, options: ServerOptions | None = None, log_file: Path | None = None) -> None:
        options = options or ServerOptions()
        self.options = replace(options, grpc_port=options.grpc_port or free_port(),  # the caller's options stay
                               http_port=options.http_port or free_port(), metrics_port=options.metrics_port or free_port())
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._tail: deque[str] = deque(maxlen=60)
        self._log_handle: TextIO | None = None
        self._health: Any = None
        # the python backend's shared-memory regions carry this prefix, so the ones a killed server leaves
        # in /dev/shm (gigabytes of RAM) are found and removed when it is stopped
        self._shm_prefix = f"medseg_{os.getpid()}_{id(self):x}_"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.address}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.options.address}:{self.options.http_port}"

    def command(self) -> list[str]:
        """The tritonserver command line."""
        o = self.options
        binary, _ = tritonserver_binary()
        args = [
            str(binary),
            f"--model-repository={o.model_repository}",
            f"--backend-directory={python_backend_dir()}",
            f"--grpc-address={o.address}",
            f"--grpc-port={o.grpc_port}",
            *([f"--http-address={o.address}", f"--http-port={o.http_port}"] if o.http else ["--allow-http=false"]),
            f"--metrics-port={o.metrics_port}",
            *(["--model-control-mode=explicit", *[f"--load-model={m}" for m in o.models]] if o.models
              else ["--model-control-mode=none"]),
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            f"--log-verbose={o.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={SHM_START_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            "--exit-timeout-secs=10",
        ]
        if o.flavor != "gpu":
            args.append(f"--model-config-name={o.flavor}")
        if o.admin_key:
            protocols = ",".join(ADMIN_PROTOCOLS)
            args.append(f"--grpc-restricted-protocol={protocols}:{ADMIN_KEY_NAME}={o.admin_key}")
            if o.http:
                args.append(f"--http-restricted-api={protocols}:{ADMIN_KEY_NAME}={o.admin_key}")
        if o.tls:
            args += ["--grpc-use-ssl=true", f"--grpc-server-cert={o.tls.cert}", f"--grpc-server-key={o.tls.key}"]
        pin = ["taskset", "-c", o.cpus] if o.cpus else []
        return pin + args + o.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: its libraries, and this interpreter's bin first so stubs import medseg."""
        _, libs = tritonserver_binary()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        return env

    def start(self, timeout_s: float = 180.0) -> EmbeddedServer:
        """Start the server and return once it reports ready; raise ServerError with its log otherwise."""
        if self.log_file is not None:
            self._log_handle = open(self.log_file, "a")  # a restart appends to the same log
        self._proc = subprocess.Popen(
            self.command(), env=self.environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_terminate_with_parent,
        )
        Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self._proc.returncode} while starting:\n"
                                  + "".join(self._tail))
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n" + "".join(self._tail))

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace")
            self._tail.append(line)
            if self._log_handle is not None:
                self._log_handle.write(line)
                self._log_handle.flush()

    def ready(self) -> bool:
        """True once the server says it is ready over gRPC (every model loaded)."""
        import tritonclient.grpc as grpcclient

        tls = self.options.tls
        try:
            if self._health is None:
                self._health = grpcclient.InferenceServerClient(
                    self.grpc_url, ssl=tls is not None,
                    root_certificates=str(tls.ca or tls.cert) if tls is not None else None)
            return bool(self._health.is_server_ready(client_timeout=2.0))
        except Exception:  # not up yet, or refusing: not ready
            return False

    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def terminate(self) -> None:
        """Ask the server to shut down (SIGTERM) without waiting: safe inside a signal handler."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    def model_processes(self) -> list[int]:
        """PIDs of the server's python-backend model processes (the stubs it started)."""
        if self._proc is None:
            return []
        return [pid for pid, name in child_processes(self._proc.pid) if name.startswith("triton_python")]

    def resident_mb(self) -> float:
        """Resident memory (MB) of the server and its model processes together, from /proc."""
        if self._proc is None:
            return 0.0
        total = 0.0
        for pid in (self._proc.pid, *self.model_processes()):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # gone meanwhile
                continue
            total += sum(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
        return total

    def exit_code(self) -> int:
        """The server process's exit code once it has exited; 0 while it runs or where none was started."""
        return self._proc.returncode if self._proc is not None and self._proc.returncode is not None else 0

    def kill(self) -> None:
        """SIGKILL the server and its model processes at once, as a crash would (tests of recovery)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None:
            for region in Path("/dev/shm").glob(self._shm_prefix + "*"):
                region.unlink(missing_ok=True)
        if self._health is not None:
            self._health.close()
            self._health = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> EmbeddedServer:
        return self.start() if self._proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

