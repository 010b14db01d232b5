"""Results back to the PACS: C-STORE of a job's objects to one destination (pynetdicom as SCU), all or nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.node.config import Destination
from medseg_client.errors import MedsegError

# C-STORE statuses that mean stored: success, and the warnings "coercion of data elements", "elements discarded",
# "data set does not match SOP class" (the peer kept the object)
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class DeliveryError(MedsegError):
    """A destination did not take the objects (unreachable, association refused, a failure status)."""


def send_objects(destination: Destination, calling_ae: str, paths: list[Path], timeout_s: float = 30.0) -> None:
    """Send every file in ``paths`` over one association; raise DeliveryError naming the first thing that failed."""
    import pydicom
    from pynetdicom import AE

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.dimse_timeout = timeout_s * 4
    contexts: set[tuple[str, str]] = {(str(h.file_meta.MediaStorageSOPClassUID), str(h.file_meta.TransferSyntaxUID))
                                      for h in headers}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    assoc: Any = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        what = "rejected the association" if assoc.is_rejected else "did not answer"
        raise DeliveryError(f"{where} {what}")
    try:
        for path, header in zip(paths, headers, strict=True):
            status = assoc.send_c_store(path)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in STORED:
                kind = str(header.file_meta.MediaStorageSOPClassUID.name)
                raise DeliveryError(f"{where} refused {kind} ({path.name}): "
                                    + ("no response" if code < 0 else f"status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
