"""The segmenter's head: the argmax and the two probabilities the judging reads, fused into the network so that
uint8 labels and float16 probabilities leave it instead of float32 logits over the whole grid (5 bytes a voxel,
not 12: what crosses from the segmenter to the postprocess, and from a GPU to the host, is what was slow).

The same module is exported to ONNX (ONNX Runtime, TensorRT) and run by PyTorch (the cuda flavor);
``medseg.ops.postprocess.head`` states it in numpy for tests that make logits by hand.
"""

from __future__ import annotations

from typing import Any

import torch

from medseg_client.spec import TUMOR


class LabelsAndProbabilities(torch.nn.Module):
    """(B, 1, Z, Y, X) image -> (B, Z, Y, X) uint8 argmax labels (ties to the lower class) and (B, 2, Z, Y, X)
    float16 probabilities: the tumor class's and the predicted class's, from the float32 softmax."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.network(image).float()
        shifted = torch.exp(logits - logits.amax(dim=1, keepdim=True))
        total = shifted.sum(dim=1)
        # the predicted class's probability is exp(0) / total: no second pass over the classes
        probabilities = torch.stack([shifted[:, TUMOR] / total, total.reciprocal()], dim=1).to(torch.float16)
        return logits.argmax(dim=1).to(torch.uint8), probabilities


def load_segmenter(**kwargs: Any) -> LabelsAndProbabilities:
    """The shipped network with its head, float32 on the CPU, eval mode (``load_network``'s arguments)."""
    from medseg.model.network import load_network

    return LabelsAndProbabilities(load_network(**kwargs)).eval()
