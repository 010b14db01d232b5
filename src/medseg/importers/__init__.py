"""Offline: a hospital's own model made servable (``medseg import``): its card, its ONNX checked against the
framework it came from, its configs in the model repository."""
