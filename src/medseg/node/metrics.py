"""Prometheus metrics of the node, read from its database at each scrape (so they survive restarts and count what
``medseg jobs`` shows): queue depth per priority, jobs per state, per-stage latency histograms, failures."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from medseg.node.store import Store

BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
# stage -> (from, to) job timestamps; "total" is receipt (the series' last instance) to every result confirmed sent
STAGES = {"queued": ("queued_at", "started_at"), "segment": ("started_at", "segmented_at"),
          "send": ("segmented_at", "sent_at"), "total": ("received_at", "sent_at")}


def _esc(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render(store: Store) -> str:
    """The exposition text (format 0.0.4)."""
    lines = ["# HELP medseg_node_queue_depth Jobs waiting to run, per priority.", "# TYPE medseg_node_queue_depth gauge"]
    depth = {r["priority"]: r["n"] for r in store.query(
        "SELECT priority, COUNT(*) AS n FROM jobs WHERE state = 'queued' GROUP BY priority")}
    lines += [f'medseg_node_queue_depth{{priority="{p}"}} {depth.get(p, 0)}' for p in ("stat", "routine")]
    lines += ["# HELP medseg_node_jobs Jobs per state and priority.", "# TYPE medseg_node_jobs gauge"]
    lines += [f'medseg_node_jobs{{state="{r["state"]}",priority="{r["priority"]}"}} {r["n"]}' for r in store.query(
        "SELECT state, priority, COUNT(*) AS n FROM jobs GROUP BY state, priority ORDER BY state, priority")]
    lines += ["# HELP medseg_node_series Received series per state.", "# TYPE medseg_node_series gauge"]
    lines += [f'medseg_node_series{{state="{r["state"]}"}} {r["n"]}' for r in store.query(
        "SELECT state, COUNT(*) AS n FROM series GROUP BY state ORDER BY state")]
    lines += ["# HELP medseg_node_deliveries_pending Result deliveries waiting, per destination.",
              "# TYPE medseg_node_deliveries_pending gauge"]
    lines += [f'medseg_node_deliveries_pending{{destination="{_esc(r["destination"])}"}} {r["n"]}' for r in store.query(
        "SELECT destination, COUNT(*) AS n FROM deliveries WHERE state = 'pending' GROUP BY destination")]
    lines += ["# HELP medseg_node_stored_bytes Bytes of received instances held on disk.",
              "# TYPE medseg_node_stored_bytes gauge", f"medseg_node_stored_bytes {store.stored_bytes()}"]
    lines += ["# HELP medseg_node_stage_seconds Per-stage latency of jobs (total: receipt of the series' last instance "
              "to every result confirmed sent).", "# TYPE medseg_node_stage_seconds histogram"]
    for stage, (start, end) in STAGES.items():
        for priority in ("stat", "routine"):
            values = [float(r["d"]) for r in store.query(
                f"SELECT {end} - {start} AS d FROM jobs WHERE priority = ? AND {start} IS NOT NULL AND {end} IS NOT NULL "
                f"AND {end} >= {start}", (priority,))]
            labels = f'stage="{stage}",priority="{priority}"'
            for b in BUCKETS:
                lines.append(f'medseg_node_stage_seconds_bucket{{{labels},le="{b}"}} {sum(v <= b for v in values)}')
            lines.append(f'medseg_node_stage_seconds_bucket{{{labels},le="+Inf"}} {len(values)}')
            lines.append(f"medseg_node_stage_seconds_sum{{{labels}}} {sum(values):.3f}")
            lines.append(f"medseg_node_stage_seconds_count{{{labels}}} {len(values)}")
    lines += ["# HELP medseg_node_events_total Refusals and failures since the database was made, per kind.",
              "# TYPE medseg_node_events_total counter"]
    lines += [f'medseg_node_events_total{{kind="{_esc(r["kind"])}"}} {r["count"]}' for r in store.query(
        "SELECT kind, count FROM events ORDER BY kind")]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on its own thread; ``port`` 0 takes a free one (``self.port`` says which)."""

    def __init__(self, store: Store, host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = render(store).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line each
                return

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="medseg-node-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
