"""The segmenter network, built from the spec, and its shipped weights (verified by sha256)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.paths import WEIGHTS_DIR
from medseg_client.errors import ArtifactError
from medseg_client.spec import SPEC

WEIGHTS_FILE = WEIGHTS_DIR / "ct_liver_unet.fp16.pt"
MANIFEST_FILE = WEIGHTS_DIR / "manifest.json"


def build_network() -> Any:
    """A MONAI 3-D UNet with the spec's channels, strides and residual units (float32, eval mode)."""
    from monai.networks.nets import UNet

    net = SPEC.network
    return UNet(
        spatial_dims=3,
        in_channels=net.in_channels,
        out_channels=SPEC.num_classes,
        channels=net.channels,
        strides=net.strides,
        num_res_units=net.num_res_units,
        norm=net.norm,
    ).eval()


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class WeightsInfo:
    """What the manifest says of the shipped weights, checked against the file."""

    path: Path
    sha256: str
    manifest: dict[str, Any]


def weights_info(weights: Path = WEIGHTS_FILE, manifest: Path = MANIFEST_FILE) -> WeightsInfo:
    """Read the manifest and check the weights file's sha256 against it."""
    if not weights.exists() or not manifest.exists():
        raise ArtifactError(f"trained weights not found: expected {weights} and {manifest}; run `make weights`")
    data = json.loads(manifest.read_text())
    digest = sha256_of(weights)
    if data.get("sha256") != digest:
        raise ArtifactError(f"weights {weights.name} have sha256 {digest}, the manifest says {data.get('sha256')}")
    return WeightsInfo(weights, digest, data)


def load_network(weights: Path = WEIGHTS_FILE, manifest: Path = MANIFEST_FILE) -> Any:
    """The network with the shipped (fp16-stored) weights, as float32 on the CPU."""
    import torch

    info = weights_info(weights, manifest)
    state = torch.load(info.path, map_location="cpu", weights_only=True)
    model = build_network()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model
