"""The node's durable state: received instances, series, jobs and deliveries in one SQLite database (WAL).

Every state change is one transaction, so a node killed at any instant restarts from a consistent state:
instances are on disk before the database knows them (and before the sender is told they are stored), a job that
was running when the node died is queued again (``recover``), a delivery is marked sent only after the peer
confirmed every object, and the objects' UIDs are derived from the study, series, model and version, so whatever
is sent twice lands once.

States: series ``receiving -> routed | skipped | refused``; job ``queued -> running -> segmented -> sent``, or
``failed`` (with the error; ``medseg jobs retry`` queues it again); delivery ``pending -> sent``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg.node.config import PRIORITIES

SCHEMA = """
CREATE TABLE IF NOT EXISTS series(
  series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, calling_aet TEXT, called_aet TEXT, priority TEXT NOT NULL,
  info TEXT NOT NULL, first_received REAL NOT NULL, last_received REAL NOT NULL, instances INTEGER NOT NULL DEFAULT 0,
  bytes INTEGER NOT NULL DEFAULT 0, frames INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, reason TEXT,
  folder TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances(
  sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs(
  id INTEGER PRIMARY KEY, series_uid TEXT NOT NULL UNIQUE, study_uid TEXT NOT NULL, model TEXT NOT NULL,
  route TEXT NOT NULL, priority TEXT NOT NULL, rank INTEGER NOT NULL, state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, error TEXT, received_at REAL NOT NULL, queued_at REAL NOT NULL,
  started_at REAL, segmented_at REAL, sent_at REAL, timings TEXT, outputs TEXT, summary TEXT);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, rank, queued_at);
CREATE TABLE IF NOT EXISTS deliveries(
  job_id INTEGER NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt REAL NOT NULL, error TEXT, sent_at REAL, PRIMARY KEY(job_id, destination));
CREATE TABLE IF NOT EXISTS events(kind TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""

JOB_COLUMNS = ("id", "series_uid", "study_uid", "model", "route", "priority", "rank", "state", "attempts", "error",
               "received_at", "queued_at", "started_at", "segmented_at", "sent_at", "timings", "outputs", "summary")


class Store:
    """One connection shared by the node's threads (a lock serialises them); other processes (``medseg jobs``)
    open their own: WAL lets them read while the node writes, and ``busy_timeout`` waits out a writer."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a confirmed C-STORE or a sent result survives power loss
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(series)")}
        if "frames" not in columns:  # a store made before multi-frame series were counted by their frames
            self._db.execute("ALTER TABLE series ADD COLUMN frames INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: taken at once, so two writers never deadlock)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    def count(self, kind: str, n: int = 1) -> None:
        """Add to a monotonic counter (failures, refusals): what the metrics report as ``*_total``."""
        with self.tx() as db:
            db.execute("INSERT INTO events(kind, count) VALUES(?, ?) ON CONFLICT(kind) DO UPDATE SET count = count + ?",
                       (kind, n, n))

    # --- receiving ---------------------------------------------------------------------------------------------
    def add_instance(self, sop_uid: str, series_uid: str, study_uid: str, path: Path, size: int, info: dict[str, Any],
                     calling: str, called: str, priority: str, folder: Path, frames: int = 1) -> tuple[bool, str]:
        """Record an instance already on disk; (whether it is new, its series' state). A series that is still
        receiving takes the more urgent of its instances' priorities."""
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT state, priority FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None:
                db.execute("INSERT INTO series(series_uid, study_uid, calling_aet, called_aet, priority, info, "
                           "first_received, last_received, state, folder) VALUES(?,?,?,?,?,?,?,?,'receiving',?)",
                           (series_uid, study_uid, calling, called, priority, json.dumps(info), now, now, str(folder)))
                state = "receiving"
            else:
                state = str(row["state"])
            new = db.execute("INSERT OR IGNORE INTO instances(sop_uid, series_uid, path, bytes) VALUES(?,?,?,?)",
                             (sop_uid, series_uid, str(path), size)).rowcount == 1
            if new:
                urgent = min(priority, str(row["priority"]) if row else priority, key=PRIORITIES.__getitem__)
                db.execute("UPDATE series SET instances = instances + 1, bytes = bytes + ?, frames = frames + ?, "
                           "last_received = ?, priority = ? WHERE series_uid = ?", (size, max(1, frames), now, urgent,
                                                                                   series_uid))
            return new, state

    def series_row(self, series_uid: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        return rows[0] if rows else None

    def refuse_series(self, series_uid: str, reason: str) -> bool:
        """Mark a series refused (it stays refused: later instances are refused too); False if already decided."""
        with self.tx() as db:
            return db.execute("UPDATE series SET state = 'refused', reason = ? WHERE series_uid = ? AND state = 'receiving'",
                              (reason, series_uid)).rowcount == 1

    def stored_bytes(self) -> int:
        """Bytes of received instances the node still holds."""
        return int(self.query("SELECT COALESCE(SUM(bytes), 0) AS n FROM instances")[0]["n"])

    def quiet_series(self, quiet_s: float) -> list[sqlite3.Row]:
        """Series still receiving whose last instance came ``quiet_s`` ago or longer: complete, to be routed."""
        return self.query("SELECT * FROM series WHERE state = 'receiving' AND last_received <= ? ORDER BY last_received",
                          (time.time() - quiet_s,))

    def skip_series(self, series_uid: str, reason: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE series SET state = 'skipped', reason = ? WHERE series_uid = ?", (reason, series_uid))

    def drop_instances(self, series_uid: str) -> None:
        """Drop a series' received instances: from the index, then their folder from the disk (a crash between the
        two leaves files no row counts, never a row without its file)."""
        import shutil

        with self.tx() as db:
            db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            row = db.execute("SELECT folder FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        if row is not None:
            shutil.rmtree(row["folder"], ignore_errors=True)

    # --- jobs ---------------------------------------------------------------------------------------------------
    def create_job(self, series: sqlite3.Row, model: str, route: str, priority: str) -> int:
        """Queue the series' job (one per series: routing a series twice returns the same job)."""
        with self.tx() as db:
            db.execute("UPDATE series SET state = 'routed', reason = ? WHERE series_uid = ?",
                       (f"route {route} -> {model}", series["series_uid"]))
            db.execute("INSERT OR IGNORE INTO jobs(series_uid, study_uid, model, route, priority, rank, state, "
                       "received_at, queued_at) VALUES(?,?,?,?,?,?,'queued',?,?)",
                       (series["series_uid"], series["study_uid"], model, route, priority, PRIORITIES[priority],
                        series["last_received"], time.time()))
            return int(db.execute("SELECT id FROM jobs WHERE series_uid = ?", (series["series_uid"],)).fetchone()[0])

    def claim(self, stat_only: bool) -> sqlite3.Row | None:
        """Take the most urgent queued job (STAT first, then the oldest): running, one more attempt. While a STAT
        job runs, no routine job starts (the STAT job has the server to itself, and is back before any routine
        job that was still waiting when it started)."""
        stat = PRIORITIES["stat"]
        with self.tx() as db:
            stat_running = db.execute("SELECT 1 FROM jobs WHERE state = 'running' AND rank = ?", (stat,)).fetchone()
            where = "state = 'queued'" + (f" AND rank = {stat}" if stat_only or stat_running else "")
            row = db.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY rank, queued_at, id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, error = NULL "
                       "WHERE id = ?", (time.time(), row["id"]))
            return db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()  # type: ignore[no-any-return]

    def job(self, job_id: int) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def segmented(self, job_id: int, outputs: list[dict[str, str]], timings: dict[str, float], summary: dict[str, Any],
                  destinations: tuple[str, ...]) -> None:
        """The job's objects are on disk: record them and owe each destination a delivery, in one transaction."""
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE jobs SET state = 'segmented', segmented_at = ?, outputs = ?, timings = ?, summary = ? "
                       "WHERE id = ?", (now, json.dumps(outputs), json.dumps(timings), json.dumps(summary), job_id))
            for d in destinations:
                db.execute("INSERT OR IGNORE INTO deliveries(job_id, destination, state, next_attempt) "
                           "VALUES(?, ?, 'pending', ?)", (job_id, d, now))

    def job_failed(self, job_id: int, error: str, final: bool, count_attempt: bool = True) -> None:
        """A failed attempt: queued again (``final`` False) or failed for good; ``count_attempt`` False gives the
        attempt back (the server was unreachable: the job itself did not fail)."""
        with self.tx() as db:
            db.execute("UPDATE jobs SET state = ?, error = ?, attempts = attempts - ? WHERE id = ?",
                       ("failed" if final else "queued", error, 0 if count_attempt else 1, job_id))

    def recover(self, max_attempts: int) -> tuple[list[int], list[int]]:
        """At start: jobs left running by a dead node go back to the queue, or fail after ``max_attempts``; the ids
        of each (queued again, failed)."""
        with self.tx() as db:
            failed = [int(r["id"]) for r in db.execute("SELECT id FROM jobs WHERE state = 'running' AND attempts >= ?",
                                                       (max_attempts,))]
            db.execute("UPDATE jobs SET state = 'failed', error = 'interrupted ' || attempts || ' times (node stopped "
                       "mid-job)' WHERE state = 'running' AND attempts >= ?", (max_attempts,))
            queued = [int(r["id"]) for r in db.execute("SELECT id FROM jobs WHERE state = 'running'")]
            db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'")
            return queued, failed

    def retry(self, job_id: int) -> str:
        """``medseg jobs retry``: a failed job is queued again with fresh attempts; a delivery waiting on its
        backoff is tried now. What was done, in words."""
        with self.tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return f"no job {job_id}"
            if row["state"] == "failed":
                db.execute("UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, queued_at = ? WHERE id = ?",
                           (time.time(), job_id))
                return f"job {job_id} queued again"
            n = db.execute("UPDATE deliveries SET next_attempt = ? WHERE job_id = ? AND state = 'pending'",
                           (time.time(), job_id)).rowcount
            if n:
                return f"job {job_id}: {n} pending deliver{'y' if n == 1 else 'ies'} due now"
            return f"job {job_id} is {row['state']}: nothing to retry"

    # --- deliveries ---------------------------------------------------------------------------------------------
    def due_deliveries(self, destination: str) -> list[sqlite3.Row]:
        """Pending deliveries to ``destination`` whose backoff has passed, STAT first."""
        return self.query("SELECT d.*, j.outputs, j.rank FROM deliveries d JOIN jobs j ON j.id = d.job_id "
                          "WHERE d.destination = ? AND d.state = 'pending' AND d.next_attempt <= ? "
                          "ORDER BY j.rank, d.job_id", (destination, time.time()))

    def next_delivery_at(self, destination: str) -> float | None:
        rows = self.query("SELECT MIN(next_attempt) AS t FROM deliveries WHERE destination = ? AND state = 'pending'",
                          (destination,))
        return None if rows[0]["t"] is None else float(rows[0]["t"])

    def delivered(self, job_id: int, destination: str) -> bool:
        """Mark one delivery sent; True when it was the job's last one (the job is then ``sent``)."""
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE deliveries SET state = 'sent', sent_at = ?, attempts = attempts + 1, error = NULL "
                       "WHERE job_id = ? AND destination = ?", (now, job_id, destination))
            left = db.execute("SELECT COUNT(*) FROM deliveries WHERE job_id = ? AND state != 'sent'", (job_id,)).fetchone()[0]
            if left == 0:
                db.execute("UPDATE jobs SET state = 'sent', sent_at = ? WHERE id = ? AND state = 'segmented'", (now, job_id))
            return bool(left == 0)

    def delivery_failed(self, job_id: int, destination: str, error: str, initial_s: float, max_s: float) -> float:
        """One failed attempt: the next one after an exponential backoff (capped); the delay chosen."""
        with self.tx() as db:
            attempts = int(db.execute("SELECT attempts FROM deliveries WHERE job_id = ? AND destination = ?",
                                      (job_id, destination)).fetchone()[0]) + 1
            delay = min(max_s, initial_s * 2 ** (attempts - 1))
            db.execute("UPDATE deliveries SET attempts = ?, error = ?, next_attempt = ? WHERE job_id = ? AND destination = ?",
                       (attempts, error, time.time() + delay, job_id, destination))
            return delay

    def deliveries(self, job_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM deliveries WHERE job_id = ? ORDER BY destination", (job_id,))
