"""A real PACS for tests of our DICOM node: Debian's Orthanc (``/usr/sbin/Orthanc``, 1.10; `make sysdeps`) run as a
subprocess on free loopback ports, with its storage under a test's folder, and a few REST helpers (urllib, JSON).

    with Orthanc(tmp_path / "a", modalities={"node": ("MEDSEG", "127.0.0.1", port)}) as pacs:
        pacs.upload(paths)
        pacs.store_to("node", pacs.studies())  # synchronous C-STOREs of every study it holds

Readiness is polled (GET /system answering with this instance's ports, and the DICOM port accepting connections),
never waited for a fixed time. Orthanc listens on all interfaces (1.10 has no bind-address option); its HTTP server
refuses other hosts (RemoteAccessAllowed false), its DICOM server accepts a C-STORE or C-ECHO from anyone."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from medseg.serving.server import free_port

ORTHANC = "/usr/sbin/Orthanc"
NOT_INSTALLED = "Debian's orthanc is not installed: make sysdeps"
POLL_S = 0.02
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through an http_proxy


class OrthancError(AssertionError):
    """Orthanc did not start, or a REST call did not give what was expected (the message says what came)."""


class _PortTaken(OrthancError):
    """Another process holds one of its ports (``which``: "http" or "dicom")."""

    def __init__(self, message: str, which: str) -> None:
        super().__init__(message)
        self.which = which


def orthanc_missing() -> str | None:
    """Why the Orthanc tests cannot run here, or None."""
    return None if os.access(ORTHANC, os.X_OK) else NOT_INSTALLED


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """SIGTERM to Orthanc when the thread that started it dies (a killed pytest leaves no Orthanc behind)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Orthanc:
    """One Orthanc on free loopback ports (the same ones across restarts), its index and storage under
    ``workdir`` (so they survive a restart), its log in ``workdir/orthanc.log``; a context manager that starts and
    stops it. ``modalities``: name -> (AE title, host, port) it may C-STORE to (``add_modality`` adds one later);
    ``http_port``/``dicom_port``: 0 for a free one."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None, http_port: int = 0,
                 dicom_port: int = 0) -> None:
        if not 0 < len(aet) <= 16:
            raise ValueError(f"an AE title has 1 to 16 characters, got {aet!r}")
        self.workdir = Path(workdir)
        self.aet = aet
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._dicom_port = dicom_port  # 0: a free one, chosen at the first start
        self._http_port = http_port
        self._log_offset = 0  # where this run's lines start in the log (a restart appends)
        self._terminating = False

    # --- the process ---------------------------------------------------------------------------------------------

    @property
    def dicom_port(self) -> int:
        self._require_ports()
        return self._dicom_port

    @property
    def http_port(self) -> int:
        self._require_ports()
        return self._http_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _require_ports(self) -> None:
        if not (self._http_port and self._dicom_port):
            raise OrthancError("Orthanc has no ports yet: call start() first")

    def config(self) -> dict[str, Any]:
        """The configuration it runs with (written to ``config_path`` by ``start``)."""
        return {
            "Name": f"medseg-test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "SyncStorageArea": False,  # no fsync per file; a clean stop (SIGTERM) still leaves everything on disk
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self._http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "SslEnabled": False,
            "WebDavEnabled": False,
            "OrthancExplorerEnabled": False,
            "HttpThreadsCount": 10,
            "HttpTimeout": 10,  # Orthanc's own outgoing HTTP requests (peers)
            "HttpRequestTimeout": 30,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self._dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomScuTimeout": 10,
            "DicomScpTimeout": 30,
            "DicomThreadsCount": 4,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {name: {"AET": a, "Host": h, "Port": p} for name, (a, h, p) in self.modalities.items()},
            "StableAge": 1,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "JobsHistorySize": 50,  # a synchronous REST job needs a history
            "OverwriteInstances": False,
            "DeidentifyLogs": False,
        }

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        """Write the configuration, launch Orthanc, and return once it answers on both ports; OrthancError with
        the log's tail if it exits or does not answer within ``timeout_s``. Free ports are chosen at the first
        start (and chosen again, up to 3 times, if something takes one before Orthanc binds it); later starts
        keep them, so the modalities that point at this one stay right."""
        if orthanc_missing():
            raise OrthancError(NOT_INSTALLED)
        if self.running:
            raise OrthancError(f"Orthanc {self.aet} is already running (pid {self.proc.pid if self.proc else '?'})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        auto = [which for which in ("http", "dicom") if not getattr(self, f"_{which}_port")]  # ours to choose
        for attempt in range(3):
            while not self._http_port or self._http_port == self._dicom_port:
                self._http_port = free_port()
            while not self._dicom_port or self._dicom_port == self._http_port:
                self._dicom_port = free_port()
            try:
                self._launch(timeout_s)
                return self
            except _PortTaken as e:
                if e.which not in auto or attempt == 2:
                    raise
                setattr(self, f"_{e.which}_port", 0)  # a race lost to another process: another free port
        raise AssertionError("unreachable")

    def _launch(self, timeout_s: float) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir, preexec_fn=_die_with_parent)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop(graceful=False)
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log_tail()
                message = (f"Orthanc {self.aet} exited ({self.proc.returncode}) before answering on http port "
                           f"{self._http_port}; log {self.log_path}:\n{tail}")
                for which in ("http", "dicom"):  # 1.10: "The TCP port of the DICOM server is ... already in use"
                    if f"port of the {which} server is privileged or already in use" in tail.lower():
                        raise _PortTaken(message, which)
                raise OrthancError(message)
            try:
                system = self.get("/system", timeout_s=2)
            except OrthancError as e:
                last = str(e)
            else:
                if (system.get("HttpPort"), system.get("DicomPort"), system.get("DicomAet")) != (
                        self._http_port, self._dicom_port, self.aet):
                    raise _PortTaken(f"something else answers on http port {self._http_port}: expected Orthanc "
                                     f"{self.aet} (dicom {self._dicom_port}), got /system {system}", "http")
                if _accepts(self._dicom_port):
                    return
                last = f"/system answers but dicom port {self._dicom_port} refuses connections"
            if time.monotonic() > deadline:
                raise OrthancError(f"Orthanc {self.aet} not ready within {timeout_s:g} s ({last}); "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(POLL_S)

    def stop(self, timeout_s: float = 30.0, graceful: bool = True) -> int | None:
        """SIGTERM (Orthanc 1.10 takes about 3.5 s to shut down cleanly), wait up to ``timeout_s``, then SIGKILL;
        ``graceful=False``: SIGKILL at once (what was stored stays: the index commits per instance). The exit
        status (None when it was not running)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            if not graceful:
                proc.kill()
            elif not self._terminating:
                proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        self._terminating = False
        return proc.returncode

    def terminate(self) -> None:
        """Send SIGTERM and return at once (``stop`` then waits): several instances shut down side by side."""
        if self.running and not self._terminating:
            assert self.proc is not None
            self.proc.terminate()
            self._terminating = True

    def restart(self, timeout_s: float = 30.0) -> Orthanc:
        """Stop and start again: same ports, same storage, the modalities added meanwhile kept."""
        self.stop()
        return self.start(timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of this run's log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return text[-chars:]

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"Orthanc({self.aet!r}, http={self._http_port}, dicom={self._dicom_port}, {state}, {self.workdir})"

    # --- REST ----------------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | str | dict[str, Any] | list[Any] | None = None,
                timeout_s: float = 60.0, raw: bool = False) -> Any:
        """``method`` ``path`` on the REST API: the answer's JSON (its bytes with ``raw``); OrthancError with the
        status and Orthanc's error message otherwise. A dict or list body is sent as JSON, a str as text."""
        headers = {}
        data: bytes | None
        if isinstance(body, (dict, list)):
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif isinstance(body, str):
            data, headers["Content-Type"] = body.encode(), "text/plain"
        else:
            data = body
            if body is not None:
                headers["Content-Type"] = "application/dicom"
        url = self.url + path
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with _OPENER.open(req, timeout=timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                err = json.loads(detail)
                parts = [str(err[k]) for k in ("Message", "Details", "OrthancError") if err.get(k)]
                detail = "; ".join(dict.fromkeys(parts))  # Message and OrthancError are often the same words
            except (ValueError, AttributeError):
                pass
            raise OrthancError(f"{method} {url}: HTTP {e.code} {e.reason}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise OrthancError(f"{method} {url}: {getattr(e, 'reason', e)}") from None
        if raw:
            return payload
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise OrthancError(f"{method} {url}: expected JSON, got {payload[:200]!r}") from None

    def get(self, path: str, timeout_s: float = 60.0) -> Any:
        return self.request("GET", path, timeout_s=timeout_s)

    def system(self) -> dict[str, Any]:
        return dict(self.get("/system"))

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register (or replace) a modality it may C-STORE to: for the next starts (config) and, when it runs, now
        (REST PUT /modalities/{name})."""
        self.modalities[name] = (aet, host, port)
        if self.running:
            self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def echo(self, modality: str, timeout_s: float = 10.0) -> None:
        """C-ECHO to ``modality``; OrthancError when it does not answer."""
        self.request("POST", f"/modalities/{modality}/echo", {"Timeout": max(1, round(timeout_s))},
                     timeout_s=timeout_s + 5)

    def upload(self, paths: Iterable[Path | str]) -> list[str]:
        """POST each DICOM file to /instances; their Orthanc instance ids (one stored before counts too)."""
        ids = []
        for path in paths:
            answer = self.request("POST", "/instances", Path(path).read_bytes())
            if not isinstance(answer, dict) or answer.get("Status") not in ("Success", "AlreadyStored"):
                raise OrthancError(f"upload of {path}: expected Status Success or AlreadyStored, got {answer}")
            ids.append(str(answer["ID"]))
        return ids

    def store_to(self, modality: str, resources: list[str] | str, synchronous: bool = True,
                 timeout_s: float = 120.0, check: bool = True) -> dict[str, Any]:
        """C-STORE Orthanc resources (ids of patients, studies, series or instances) to ``modality``. Synchronous:
        returns when every instance is answered (``InstancesCount``, ``FailedInstancesCount``; OrthancError if
        the store failed, or with ``check`` if any instance did); otherwise returns the job at once ({"ID",
        "Path"}; ``wait_job`` waits for it)."""
        resources = [resources] if isinstance(resources, str) else list(resources)
        if not resources:
            raise ValueError("store_to: no resources")
        answer = self.request("POST", f"/modalities/{modality}/store",
                              {"Resources": resources, "Synchronous": synchronous}, timeout_s=timeout_s)
        if not isinstance(answer, dict):
            raise OrthancError(f"store to {modality}: expected a JSON object, got {answer!r}")
        if synchronous and check and answer.get("FailedInstancesCount", 0):
            raise OrthancError(f"store to {modality}: {answer['FailedInstancesCount']} instances failed: {answer}")
        return answer

    def wait_job(self, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Poll /jobs/{id} until it succeeds (its JSON); OrthancError if it fails or is still going at the end."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(f"/jobs/{job_id}")
            if job.get("State") == "Success":
                return dict(job)
            if job.get("State") == "Failure":
                raise OrthancError(f"job {job_id} ({job.get('Type')}) failed: {job.get('ErrorDescription')} "
                                   f"{job.get('ErrorDetails', '')}; {job}")
            if time.monotonic() > deadline:
                raise OrthancError(f"job {job_id} not done within {timeout_s:g} s: {job}")
            time.sleep(POLL_S)

    def studies(self) -> list[str]:
        """Orthanc ids of the studies it holds."""
        return [str(s) for s in self.get("/studies")]

    def study_by_uid(self, study_uid: str) -> str | None:
        """The Orthanc id of the study with this StudyInstanceUID, or None."""
        found = self.request("POST", "/tools/lookup", study_uid)
        ids = [m["ID"] for m in found or [] if m.get("Type") == "Study"]
        if len(ids) > 1:
            raise OrthancError(f"StudyInstanceUID {study_uid}: expected at most one study, got {found}")
        return str(ids[0]) if ids else None

    def series_in_study(self, study_uid: str) -> list[dict[str, Any]]:
        """The series of a study (none if it is not there) as Orthanc gives them (ID, MainDicomTags with Modality,
        SeriesInstanceUID, SeriesDescription..., Instances: ids), with ``InstanceCount`` added; by SeriesNumber."""
        study = self.study_by_uid(study_uid)
        if study is None:
            return []
        series = [dict(s, InstanceCount=len(s.get("Instances", []))) for s in self.get(f"/studies/{study}/series")]

        def number(s: dict[str, Any]) -> tuple[int, str]:
            tags = s.get("MainDicomTags", {})
            n = str(tags.get("SeriesNumber", "")).strip()
            return (int(n) if n.lstrip("-").isdigit() else 1 << 31, str(tags.get("SeriesInstanceUID", "")))

        return sorted(series, key=number)

    def instances_of_series(self, series_id: str) -> list[dict[str, Any]]:
        """The instances of a series (Orthanc ids and main tags), by InstanceNumber."""
        instances = list(self.get(f"/series/{series_id}/instances"))

        def number(i: dict[str, Any]) -> int:
            n = str(i.get("MainDicomTags", {}).get("InstanceNumber", "")).strip()
            return int(n) if n.lstrip("-").isdigit() else 1 << 31

        return sorted(instances, key=number)

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of an instance, as stored."""
        data = self.request("GET", f"/instances/{instance_id}/file", raw=True)
        if data[128:132] != b"DICM":
            raise OrthancError(f"instance {instance_id}: expected a DICOM file (DICM at 128), got {data[:140]!r}")
        return bytes(data)

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (GET /instances/{id}/simplified-tags)."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def delete_all(self) -> None:
        """Delete every patient (and so everything) it holds."""
        for patient in self.get("/patients"):
            self.request("DELETE", f"/patients/{patient}")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def stop_all(*instances: Orthanc, timeout_s: float = 30.0) -> None:
    """Stop several at once (SIGTERM to all, then wait for each): one shutdown's time, not one per instance."""
    for o in instances:
        o.terminate()
    for o in instances:
        o.stop(timeout_s)
