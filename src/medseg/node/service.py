"""``medseg node``: the receiver, the router, the workers and the senders around one durable store.

Threads: pynetdicom's (one per association) receive; the router turns series quiet for ``quiet_period_s`` into
jobs or recorded skips; ``workers`` take the most urgent queued job (STAT first) and ``stat_workers`` take STAT
jobs only, so a STAT study never waits for a routine one to finish; one sender per destination delivers results
(a destination that is down only delays its own deliveries, with exponential backoff). Everything they do is in
the store first, so a node killed at any moment resumes where it was.

Triton's priority levels would not carry a STAT request through the ensemble (its composing models are scheduled
without the request's priority); the node orders its own queue and keeps STAT workers instead, and sends one
request per worker so the server's queue never holds routine work in front of a STAT request for long.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from medseg.node.audit import Audit
from medseg.node.config import NodeConfig
from medseg.node.metrics import MetricsServer
from medseg.node.receiver import Receiver
from medseg.node.rules import SeriesInfo, decide
from medseg.node.sender import DeliveryError, send_objects
from medseg.node.store import Store
from medseg_client.errors import MedsegError, ServerError, one_line

POLL_S = 0.2  # how often idle threads look at the store (a receipt or a queued job also wakes them)


class NodeBusyError(MedsegError):
    """Another node already runs on this storage folder."""


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


class Node:
    """The running node; ``start`` then ``wait`` (or ``stop``)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.storage.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(config.storage / "node.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise NodeBusyError(f"another medseg node uses the storage folder {config.storage}") from None
        self.store = Store(config.db_path)
        self.audit = Audit(config.audit_path)
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.receiver = Receiver(config, self.store, self.audit)
        self.outbox = config.storage / "outbox"
        self._threads: list[threading.Thread] = []
        self.metrics: MetricsServer | None = None
        self.port = 0

    def check_models(self) -> None:
        """Refuse to start when a route names a model the server does not serve; a server that does not answer yet
        is only noted (jobs wait for it, with retries)."""
        from medseg.node.config import ConfigError
        from medseg_client.client import SegmentationClient, ServerUnavailableError

        missing = []
        with SegmentationClient(self.config.server, timeout_s=10.0, retries=0) as client:
            for model in sorted({r.model for r in self.config.routes if r.model}):
                try:
                    ready = client.model_ready(model)
                except ServerUnavailableError as e:
                    _log(f"note: the server does not answer yet ({one_line(str(e))}); routes are not checked against it")
                    return
                except ServerError:  # NOT_FOUND: an unknown model
                    ready = False
                if not ready:
                    missing.append(model)
        if missing:
            raise ConfigError(f"routes send series to {', '.join(missing)}, which {self.config.server} does not serve "
                              "(`medseg models` lists what it serves)")

    def start(self) -> None:
        self.check_models()
        queued, failed = self.store.recover(self.config.job_attempts)
        for job_id in queued:
            self.audit("recovered", job=job_id, note="running when the node stopped; queued again")
        for job_id in failed:
            self.audit("failed", job=job_id, error="running when the node stopped, out of attempts", final=True)
        self.port = self.receiver.start()
        if self.config.metrics_port is not None:
            self.metrics = MetricsServer(self.store, self.config.metrics_host, self.config.metrics_port)
        spawn: list[tuple[str, Any, tuple[Any, ...]]] = [("router", self._route_loop, ())]
        spawn += [(f"worker-{i}", self._work_loop, (False,)) for i in range(self.config.workers)]
        spawn += [(f"stat-worker-{i}", self._work_loop, (True,)) for i in range(self.config.stat_workers)]
        spawn += [(f"send-{name}", self._send_loop, (name,)) for name in self.config.destinations]
        for name, target, args in spawn:
            t = threading.Thread(target=self._guarded, args=(name, target, *args), name=f"medseg-node-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        metrics = f", metrics on {self.config.metrics_host}:{self.metrics.port}/metrics" if self.metrics else ""
        _log(f"medseg node {self.config.ae_title} listening on {self.config.host}:{self.port}{metrics}; "
             f"server {self.config.server}; storage {self.config.storage}")

    def _guarded(self, name: str, target: Any, *args: Any) -> None:
        """Run a loop; a bug in one iteration is logged (type and place, not the message) and the loop goes on."""
        while not self.stop_event.is_set():
            try:
                target(*args)
                return
            except Exception as e:
                tb = e.__traceback__
                while tb is not None and tb.tb_next is not None:
                    tb = tb.tb_next
                place = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
                _log(f"internal error in {name} ({type(e).__name__} at {place}); continuing")
                self.store.count("internal_errors")
                self.stop_event.wait(1.0)

    def wait(self) -> None:
        while not self.stop_event.wait(1.0):
            pass

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        self.receiver.stop()
        for t in self._threads:
            t.join(timeout=30)
        if self.metrics is not None:
            self.metrics.close()
        self.audit.close()
        self.store.close()
        os.close(self._lock_fd)

    # --- routing ------------------------------------------------------------------------------------------------
    def _route_loop(self) -> None:
        while not self.stop_event.is_set():
            for series in self.store.quiet_series(self.config.quiet_period_s):
                self._route(series)
            self.stop_event.wait(min(POLL_S, self.config.quiet_period_s / 4))

    def _route(self, series: Any) -> None:
        h = json.loads(series["info"])
        info = SeriesInfo(sop_class_uid=h["sop_class_uid"], modality=h["modality"], body_part=h["body_part"],
                          description=h["description"], image_type=tuple(h["image_type"]),
                          slice_thickness_mm=h["slice_thickness_mm"], images=int(series["frames"] or series["instances"]),
                          calling_ae_title=series["calling_aet"], called_ae_title=series["called_aet"],
                          manufacturer=h.get("manufacturer", ""))
        decision = decide(self.config.routes, info, series["priority"])
        where = {"series_instance_uid": series["series_uid"], "study_instance_uid": series["study_uid"],
                 "calling_ae_title": series["calling_aet"], "called_ae_title": series["called_aet"],
                 "instances": series["instances"]}
        if decision.skip is not None:
            self.store.skip_series(series["series_uid"], decision.skip)
            self.audit("skipped", route=decision.route, reason=decision.skip, **where)
            _log(f"series {series['series_uid']}: skipped ({decision.skip})")
            self.store.drop_instances(series["series_uid"])
            return
        assert decision.model is not None
        job_id = self.store.create_job(series, decision.model, decision.route, decision.priority)
        self.audit("routed", job=job_id, route=decision.route, model=decision.model, priority=decision.priority,
                   destinations=list(decision.destinations), **where)
        _log(f"job {job_id} ({decision.priority}): series {series['series_uid']} -> {decision.model}")
        self.wake.set()

    # --- working ------------------------------------------------------------------------------------------------
    def _destinations_of(self, route_name: str) -> tuple[str, ...]:
        for route in self.config.routes:
            if route.name == route_name:
                return route.destinations
        return tuple(self.config.destinations)  # a route renamed since the job was made: every destination

    def _work_loop(self, stat_only: bool) -> None:
        from medseg_client.client import SegmentationClient

        sessions: dict[str, SegmentationClient] = {}
        pause = 0.0  # after the server was unreachable: exponential backoff before the next claim
        try:
            while not self.stop_event.is_set():
                if pause and self.stop_event.wait(pause):
                    return
                job = self.store.claim(stat_only)
                if job is None:
                    self.wake.wait(POLL_S)
                    self.wake.clear()
                    continue
                if job["model"] not in sessions:
                    sessions[job["model"]] = SegmentationClient(self.config.server, model_name=job["model"],
                                                                timeout_s=self.config.timeout_s)
                unreachable = self._run(job, sessions[job["model"]])
                pause = min(self.config.retry_max_s, max(self.config.retry_initial_s, 2 * pause)) if unreachable else 0.0
        finally:
            for s in sessions.values():
                s.close()

    def _run(self, job: Any, session: Any) -> bool:
        """One attempt at a job; True when the server could not be reached (the job waits, its attempt given back)."""
        from medseg.node.results import make_results
        from medseg_client.client import ServerUnavailableError

        job_id, series_uid = int(job["id"]), str(job["series_uid"])
        series = self.store.series_row(series_uid)
        where = {"job": job_id, "series_instance_uid": series_uid, "study_instance_uid": job["study_uid"],
                 "model": job["model"], "priority": job["priority"], "attempt": job["attempts"]}
        self.audit("started", **where)
        _log(f"job {job_id} ({job['priority']}): segmenting, attempt {job['attempts']}")
        try:
            if series is None:
                raise MedsegError("its series is no longer in the store")
            outputs, timings, summary = make_results(Path(series["folder"]), self.outbox / str(job_id), session,
                                                     self.config.send_preview)
        except ServerUnavailableError as e:  # the server is down or restarting: the job waits, its attempt given back
            self.store.job_failed(job_id, one_line(str(e)), final=False, count_attempt=False)
            self.store.count("server_unavailable")
            self.audit("server_unavailable", error=one_line(str(e)), **where)
            _log(f"job {job_id}: the server is unavailable; queued again: {one_line(str(e))}")
            return True
        except ServerError as e:  # the server answered with an error: tried again, up to job_attempts
            final = int(job["attempts"]) >= self.config.job_attempts
            self.store.job_failed(job_id, one_line(str(e)), final)
            self.store.count("job_failures")
            self.audit("failed", error=one_line(str(e)), final=final, **where)
            _log(f"job {job_id}: {'failed' if final else 'will be retried'}: {one_line(str(e))}")
            return False
        except (MedsegError, OSError, ValueError) as e:  # the series cannot be read or segmented: no retry helps
            self.store.job_failed(job_id, one_line(str(e)), True)
            self.store.count("job_failures")
            self.audit("failed", error=one_line(str(e)), final=True, **where)
            _log(f"job {job_id}: failed: {one_line(str(e))}")
            return False
        destinations = self._destinations_of(str(job["route"]))
        self.store.segmented(job_id, outputs, timings, summary, destinations)
        self.audit("segmented", timings_s=timings, summary=summary,
                   objects={o["kind"]: o["sop_instance_uid"] for o in outputs}, **where)
        _log(f"job {job_id}: segmented in {sum(timings.values()):.1f} s ({summary['status']})")
        self.wake.set()
        return False

    # --- sending ------------------------------------------------------------------------------------------------
    def _send_loop(self, name: str) -> None:
        destination = self.config.destinations[name]
        while not self.stop_event.is_set():
            for d in self.store.due_deliveries(name):
                if self.stop_event.is_set():
                    return
                job_id = int(d["job_id"])
                paths = [Path(o["path"]) for o in json.loads(d["outputs"])]
                t0 = time.perf_counter()
                try:
                    send_objects(destination, self.config.ae_title, paths)
                except (DeliveryError, OSError) as e:
                    delay = self.store.delivery_failed(job_id, name, one_line(str(e)), self.config.retry_initial_s,
                                                       self.config.retry_max_s)
                    self.store.count("delivery_failures")
                    self.audit("send_failed", job=job_id, destination=name, error=one_line(str(e)),
                               retry_in_s=round(delay, 1))
                    _log(f"job {job_id} -> {name}: {one_line(str(e))}; next try in {delay:.0f} s")
                    break  # the destination is likely down: its other deliveries wait for their own backoff
                done = self.store.delivered(job_id, name)
                self.audit("sent", job=job_id, destination=name, ae_title=destination.ae_title,
                           seconds=round(time.perf_counter() - t0, 3),
                           objects=[o["sop_instance_uid"] for o in json.loads(d["outputs"])])
                if done:
                    job = self.store.job(job_id)
                    _log(f"job {job_id}: results sent to every destination")
                    if job is not None:
                        self._finish(job)
            nxt = self.store.next_delivery_at(name)
            self.stop_event.wait(POLL_S if nxt is None else max(0.0, min(POLL_S * 5, nxt - time.time())))

    def _finish(self, job: Any) -> None:
        """A sent job no longer needs its received instances or its objects on disk."""
        self.store.drop_instances(str(job["series_uid"]))
        shutil.rmtree(self.outbox / str(job["id"]), ignore_errors=True)
