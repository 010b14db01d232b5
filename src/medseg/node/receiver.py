"""The node's DICOM receiver: a C-STORE SCP (pynetdicom) that writes each instance to disk, then records it, then
confirms it to the sender, so a confirmed instance is never lost. Refusals are C-STORE failure statuses with the
reason in the audit trail: an instance that cannot be decoded or lacks its UIDs, a called AE title that is not
this node's, a series over the size limits, a full disk."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Any

from medseg.node.audit import Audit
from medseg.node.config import NodeConfig
from medseg.node.rules import header_info
from medseg.node.store import Store

STATUS_OK = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (the size limits, a full disk)
STATUS_CANNOT_UNDERSTAND = 0xC210  # Error: cannot understand (undecodable, UIDs missing)
STATUS_REFUSED = 0xC001  # Error: not this node's (unknown called AE title, a series already refused)
STATUS_PROCESSING_FAILURE = 0x0110  # the node could not store it (disk error): the sender keeps it and retries
PRIORITY_HIGH = 1  # C-STORE-RQ Priority: 0 medium, 1 high, 2 low
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_name(uid: str) -> str:
    """A file name for a UID: the UID itself when it is one (digits and dots), else a hash of it."""
    return uid if _UID.fullmatch(uid) and len(uid) <= 64 else "x" + hashlib.sha256(uid.encode()).hexdigest()[:32]


def write_durably(path: Path, data: bytes) -> None:
    """``data`` at ``path``, whole or not at all: a temporary file fsynced, renamed into place, the folder fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Receiver:
    """Handles C-STORE requests for ``Node``; the pynetdicom server itself is started by ``start``."""

    def __init__(self, config: NodeConfig, store: Store, audit: Audit) -> None:
        self.config, self.store, self.audit = config, store, audit
        self.incoming = config.storage / "incoming"
        self._server: Any = None
        self._titles = {config.ae_title, *config.stat_ae_titles}

    def start(self) -> int:
        """Listen on the configured host and port (0: a free one); the port listened on."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = 16
        ae.network_timeout = 60
        ae.dimse_timeout = 120
        for context in AllStoragePresentationContexts:  # every transfer syntax: PACS send JPEG, JPEG-LS, JPEG 2000 as stored
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.config.allowed_callers:
            ae.require_calling_aet = list(self.config.allowed_callers)
        self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self.on_store), (evt.EVT_REJECTED, self.on_rejected)])
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def on_rejected(self, event: Any) -> None:
        """An association refused by pynetdicom (a calling AE title not in allowed_callers): audited."""
        calling = str(event.assoc.requestor.ae_title).strip()
        allowed = ", ".join(self.config.allowed_callers) or "any"
        self.audit("refused", reason=f"association rejected: calling AE title {calling!r} is not allowed ({allowed})",
                   calling_ae_title=calling, peer=str(event.assoc.requestor.address))
        self.store.count("refused_associations")

    def _refuse(self, status: int, reason: str, **fields: Any) -> int:
        self.audit("refused", reason=reason, **fields)
        self.store.count("refused_instances")
        return status

    def on_store(self, event: Any) -> int:
        """One C-STORE: on disk, then in the database, then confirmed."""
        calling = str(event.assoc.requestor.ae_title).strip()
        called = str(event.assoc.requestor.primitive.called_ae_title).strip()
        who = {"calling_ae_title": calling, "called_ae_title": called}
        if called not in self._titles:
            return self._refuse(STATUS_REFUSED, f"called AE title {called!r} is not this node's "
                                f"({', '.join(sorted(self._titles))})", **who)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_uid, series_uid, study_uid = (str(ds.get(k, "") or "").strip() for k in
                                              ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"))
            info = header_info(ds)
            if not info["sop_class_uid"]:  # blanked by an anonymizer: the C-STORE request names it
                info["sop_class_uid"] = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
        except Exception as e:  # pydicom raises many kinds on a damaged stream; the sender hears one status
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f"instance cannot be decoded ({type(e).__name__})", **who)
        missing = [k for k, v in (("SOPInstanceUID", sop_uid), ("SeriesInstanceUID", series_uid),
                                  ("StudyInstanceUID", study_uid)) if not v]
        if missing:
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f"instance without {', '.join(missing)}", **who)
        where = {**who, "series_instance_uid": series_uid, "sop_instance_uid": sop_uid}
        series = self.store.series_row(series_uid)
        if series is not None and series["state"] == "refused":
            return self._refuse(STATUS_OUT_OF_RESOURCES, f"series already refused: {series['reason']}", **where)
        if series is not None and series["state"] != "receiving":
            # taken already (routed or skipped): the series is judged as it was when it went quiet; a PACS sending it
            # again gets its success status, and the instance is not kept (its results are the job's)
            self.audit("ignored_instance", reason=f"series already {series['state']} ({series['reason']})", **where)
            return STATUS_OK
        data = event.encoded_dataset()
        if series is None and len(data) > self.config.max_series_bytes:
            return self._refuse(STATUS_OUT_OF_RESOURCES, f"one instance larger than the series limit of "
                                f"{self.config.max_series_bytes // 1024**2} MB", **where)
        if series is not None:
            if series["instances"] >= self.config.max_instances_per_series:
                return self._refuse_series(series_uid, f"series larger than the limit of "
                                           f"{self.config.max_instances_per_series} instances", where)
            if series["bytes"] + len(data) > self.config.max_series_bytes:
                return self._refuse_series(series_uid, f"series larger than the limit of "
                                           f"{self.config.max_series_bytes // 1024**2} MB", where)
        if self.store.stored_bytes() + len(data) > self.config.max_disk_bytes:
            return self._refuse(STATUS_OUT_OF_RESOURCES, f"the node's storage limit of {self.config.max_disk_bytes // 1024**3}"
                                " GB is reached", **where)
        high = int(getattr(event.request, "Priority", 0) or 0) == PRIORITY_HIGH and self.config.stat_on_high_priority
        priority = "stat" if called in self.config.stat_ae_titles or high else "routine"
        folder = self.incoming / safe_name(study_uid) / safe_name(series_uid)
        path = folder / f"{safe_name(sop_uid)}.dcm"
        try:
            write_durably(path, data)
        except OSError as e:
            return self._refuse(STATUS_PROCESSING_FAILURE, f"cannot store the instance ({e.strerror or e})", **where)
        new, state = self.store.add_instance(sop_uid, series_uid, study_uid, path, len(data), info, calling, called,
                                             priority, folder, int(info.get("frames", 1)))
        if series is None:
            self.audit("receiving", priority=priority, study_instance_uid=study_uid, **where)
        if new and state != "receiving":  # routed between the check above and now: its job did not see it
            self.audit("late_instance", state=state, **where)
        return STATUS_OK

    def _refuse_series(self, series_uid: str, reason: str, where: dict[str, Any]) -> int:
        if self.store.refuse_series(series_uid, reason):
            self.audit("series_refused", reason=reason, **where)
            self.store.count("refused_series")
            self.store.drop_instances(series_uid)
        return self._refuse(STATUS_OUT_OF_RESOURCES, reason, **where)
