"""``medseg jobs``: the node's jobs from its store, as a table, one job in full, or a retry."""

from __future__ import annotations

import json
import time
from typing import Any

from medseg.node.config import NodeConfig
from medseg.node.store import Store
from medseg_client.errors import MedsegError


def _when(t: Any) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


def _seconds(a: Any, b: Any) -> str:
    return "-" if a is None or b is None else f"{float(b) - float(a):.1f}"


def jobs_command(config: NodeConfig, action: str, job_id: int | None, state: str | None, limit: int) -> str:
    """The text ``medseg jobs`` prints."""
    if not config.db_path.exists():
        raise MedsegError(f"no node store at {config.db_path}: has `medseg node` run with this configuration?")
    store = Store(config.db_path)
    try:
        if action == "list":
            rows = store.query("SELECT * FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY id DESC LIMIT ?",
                               ((state, limit) if state else (limit,)))
            lines = [f"{'job':>5}  {'state':<10}{'priority':<9}{'model':<16}{'tries':>5}  {'received':<19}  "
                     f"{'to result s':>11}  series / error"]
            for r in rows:
                detail = r["error"] if r["error"] else r["series_uid"]
                lines.append(f"{r['id']:>5}  {r['state']:<10}{r['priority']:<9}{r['model'][:15]:<16}{r['attempts']:>5}  "
                             f"{_when(r['received_at']):<19}  {_seconds(r['received_at'], r['sent_at']):>11}  {detail}")
            skipped = store.query("SELECT state, COUNT(*) AS n FROM series WHERE state IN ('skipped', 'refused') "
                                  "GROUP BY state")
            if skipped:
                lines.append("series not made into jobs: " + ", ".join(f"{r['n']} {r['state']}" for r in skipped)
                             + " (reasons in the audit trail)")
            return "\n".join(lines)
        if job_id is None:
            raise MedsegError(f"medseg jobs {action} needs a job number")
        if action == "retry":
            if store.job(job_id) is None:
                raise MedsegError(f"no job {job_id} in {config.db_path}")
            return store.retry(job_id)
        row = store.job(job_id)
        if row is None:
            raise MedsegError(f"no job {job_id} in {config.db_path}")
        doc = {k: row[k] for k in row.keys()}
        for k in ("timings", "outputs", "summary"):
            doc[k] = json.loads(doc[k]) if doc[k] else None
        for k in ("received_at", "queued_at", "started_at", "segmented_at", "sent_at"):
            doc[k] = _when(doc[k])
        doc["deliveries"] = [{k: d[k] for k in d.keys() if k != "job_id"} | {"next_attempt": _when(d["next_attempt"]),
                                                                             "sent_at": _when(d["sent_at"])}
                             for d in store.deliveries(job_id)]
        return json.dumps(doc, indent=2)
    finally:
        store.close()
