"""The segmentation network (``network``), its inference engines (``inference``: ONNX Runtime, PyTorch), the
provenance of the served artifact (``provenance``) and the whole pipeline in one process (``pipeline``)."""
