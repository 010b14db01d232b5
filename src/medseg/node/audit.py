"""The append-only audit trail: one JSON line per event (received, routed, skipped, refused, segmented, sent,
failed) with UIDs, AE titles, model and version, timings; never a patient's name or ID. Each line is written
with one ``write`` on a file opened for appending and flushed to disk, so lines are whole and survive a crash."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

# header keywords that identify a patient: refused as audit fields, whatever a caller passes
IDENTIFYING = {"PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress", "AccessionNumber"}


class Audit:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if _torn(path):  # a crash mid-write left a line without its end: end it, or the next record joins it
            os.write(self._fd, b"\n")
            os.fsync(self._fd)

    def __call__(self, event: str, **fields: Any) -> None:
        leaked = IDENTIFYING & set(fields)
        if leaked:
            raise ValueError(f"audit fields must not identify the patient: {sorted(leaked)}")
        now = time.time()
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
                  "event": event, **fields}
        line = (json.dumps(record, default=str) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


def _torn(path: Path) -> bool:
    with path.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_audit(path: Path) -> list[dict[str, Any]]:
    """The trail's records, oldest first (a torn last line, from a crash mid-write, is left out)."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
