"""medseg's thin client: what runs on the user's side of the wire.

- ``client``: ``SegmentationClient``, the typed gRPC client of the ensemble (``protocol``: the headers it sends);
- ``spec``: the model's one source of truth (labels and codes, grids, tensors, bounds), shared with the server;
- ``io``: studies in and results out (DICOM series and NIfTI read, labels, DICOM SEG, preview);
- ``segment`` and ``cli``: the ``medseg segment`` command; the server side adds its commands to ``medseg``.

It installs without torch, MONAI, DALI, ONNX Runtime or the Triton server (``pip install ./clients``).
"""

from medseg_client.client import SegmentationClient

__all__ = ["SegmentationClient"]
