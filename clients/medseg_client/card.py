"""Model cards: one file per served model saying everything the components must agree on.

A card holds the model's labels (values, names, colours, DICOM codes), how a study becomes the network's input
(transpose, crop, intensity normalisation, spacing, resampling orders), how the network is run (sliding window:
patch, step, Gaussian weighting, mirroring), whose semantics these follow (nnU-Net's or MONAI's), where it came
from and its version. The importers write it (``medseg import nnunet``, ``medseg import monai-bundle``), config
generation and the served steps read it, and the server hands it to clients in the ensemble's configuration
(parameter ``medseg_card``), so ``medseg segment --model NAME`` codes a SEG without a local copy.
Axes are (z, y, x) of the canonical grid; spacings in mm.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medseg_client.errors import ArtifactError
from medseg_client.spec import SPEC, Code, Label, ModelIO, Tensor

CARD_FILE = "card.json"
CARD_PARAMETER = "medseg_card"  # the ensemble config's parameter holding the card's JSON
CARD_FORMAT = 1
ROLES = ("preprocess", "segmenter", "postprocess")  # the python-backend steps of a card's ensemble


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation: ``ct`` clips to [lower, upper] then standardises by mean and std (nnU-Net's
    CTNormalization); ``window`` clips to [lower, upper] and scales to 0..1; ``scale_range`` maps [lower, upper]
    linearly onto [out_lower, out_upper], clipped there if ``clip`` (MONAI's ScaleIntensityRange); ``zscore``
    subtracts mean and divides by std (MONAI's NormalizeIntensity with fixed values)."""

    kind: str
    lower: float
    upper: float
    mean: float = 0.0
    std: float = 1.0
    out_lower: float = 0.0
    out_upper: float = 1.0
    clip: bool = True


@dataclass(frozen=True)
class Resampling:
    """Spline orders onto the model grid (data) and back (logits); ``order_z`` along a separately resampled coarse
    axis (anisotropic studies); ``softmax``: probabilities, not logits, go back (MONAI's Activations before Invertd)."""

    data_order: int = 3
    logits_order: int = 1
    order_z: int = 0
    softmax: bool = False


@dataclass(frozen=True)
class Inference:
    """How the network sees the study: ``sliding_window`` tiles of ``patch`` at ``step`` overlap, blended with
    Gaussian weights, averaged over flips along ``mirror_axes``."""

    mode: str  # sliding_window, or whole (the volume in one pass, tiled along z past a size)
    patch: tuple[int, ...]
    step: float = 0.5
    gaussian: bool = True
    mirror_axes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelCard:
    """One served model, as every component must see it."""

    name: str
    version: int
    description: str
    labels: tuple[Label, ...]  # value 0 is the background
    spacing: tuple[float, float, float]  # the model grid's spacing, in the transposed axis order
    transpose: tuple[int, int, int]  # model axes from the study's: model axis i is study axis transpose[i]
    crop_to_nonzero: bool
    normalization: Normalization
    resampling: Resampling
    inference: Inference
    in_channels: int = 1
    onnx_file: str = "model.onnx"  # the network on one tile (dynamic batch): ONNX Runtime, the cpu flavor
    torchscript_file: str = "model.ts"  # the same network traced by TorchScript: PyTorch on the GPU flavors
    # the direction each of the network's (x, y, z) array axes points to, as its training images were stored: LPS is
    # medseg's canonical grid (DICOM's, and SimpleITK's conversions'), RAS nibabel's canonical (TotalSegmentator's)
    orientation: str = "LPS"
    source: dict[str, Any] = field(default_factory=dict)  # where it came from: kind, folder, checkpoint, sha256
    # whose semantics the steps above follow, in whose order: nnunet (crop, normalise, resample; nnU-Net's window and
    # resampling), monai (orient, resample, normalise; MONAI's Spacing, sliding window and Invertd), medseg (liver)
    pipeline: str = "nnunet"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def model_io(self, role: str) -> ModelIO:
        """The name and tensors of this model's ensemble or one of its steps (``ROLES``) in the repository.

        The ensemble takes and gives what the liver model's does (CT, SPACING -> LABELS, FINDINGS), so clients
        call every model alike; between the steps go the network's input, its logits and the crop's geometry."""
        ct, spacing = SPEC.ensemble.inputs
        labels, findings = SPEC.ensemble.outputs
        image = Tensor("IMAGE", "FP32", (self.in_channels, -1, -1, -1))
        logits = Tensor("LOGITS", "FP32", (self.num_classes, -1, -1, -1))
        geometry = Tensor("GEOMETRY", "INT64", (9,))  # shape before cropping, crop box lo, crop box hi
        tensors = {
            "ensemble": ((ct, spacing), (labels, findings)),
            "preprocess": ((ct, spacing), (image, geometry)),
            "segmenter": ((image,), (logits,)),
            "postprocess": ((ct, spacing, logits, geometry), (labels, findings)),
        }
        if role not in tensors:
            raise ValueError(f"role must be one of {', '.join(tensors)}, got {role!r}")
        return ModelIO(self.name if role == "ensemble" else f"{self.name}_{role}", self.version, *tensors[role])

    def flips(self) -> tuple[int, ...]:
        """The axes of a canonical (z, y, x) LPS array to flip for this model's orientation."""
        canonical = {0: "LPS"[0], 1: "LPS"[1], 2: "LPS"[2]}  # x, y, z letters of the canonical grid
        if len(self.orientation) != 3 or any(self.orientation[i] not in (canonical[i], "RAI"[i]) for i in range(3)):
            raise ArtifactError(f"{self.name}: orientation must be 3 letters of L/R, P/A, S/I (x, y, z), "
                                f"got {self.orientation!r}")
        return tuple(2 - i for i in range(3) if self.orientation[i] != canonical[i])

    def uncoded(self) -> list[str]:
        """Names of the foreground labels that lack the DICOM codes a SEG needs."""
        return [lab.name for lab in self.labels if lab.value and (lab.category is None or lab.type is None)]

    def to_json(self, compact: bool = False) -> str:
        """The card as JSON: indented for its file, on one line for a config parameter."""
        doc = {"format": CARD_FORMAT, **asdict(self)}
        return json.dumps(doc, separators=(",", ":")) if compact else json.dumps(doc, indent=2) + "\n"

    @staticmethod
    def from_json(text: str, where: str = "card") -> ModelCard:
        try:
            d = json.loads(text)
            if d.pop("format", None) != CARD_FORMAT:
                raise ValueError(f"format must be {CARD_FORMAT}")

            def code(c: dict[str, str] | None) -> Code | None:
                return Code(**c) if c else None

            labels = tuple(Label(int(lab["value"]), lab["name"], lab["display"], tuple(lab["color"]),  # type: ignore[arg-type]
                                 code(lab.get("category")), code(lab.get("type")), code(lab.get("region")))
                           for lab in d.pop("labels"))
            inference = d.pop("inference")
            return ModelCard(
                labels=labels,
                spacing=tuple(float(s) for s in d.pop("spacing")),  # type: ignore[arg-type]
                transpose=tuple(int(t) for t in d.pop("transpose")),  # type: ignore[arg-type]
                normalization=Normalization(**d.pop("normalization")),
                resampling=Resampling(**d.pop("resampling")),
                inference=Inference(**{**inference, "patch": tuple(int(v) for v in inference["patch"]),
                                       "mirror_axes": tuple(inference["mirror_axes"])}),
                **d,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{where}: not a medseg model card ({e})") from None


def spec_card() -> ModelCard:
    """The shipped liver model (``medseg_client.spec``) as a card: what ``medseg models`` lists and clients read."""

    lo, hi = SPEC.hu_window
    return ModelCard(
        name=SPEC.ensemble.name,
        version=SPEC.ensemble.version,
        description="CT liver and liver tumor (medseg's own model, trained on phantoms)",
        labels=SPEC.labels,
        spacing=SPEC.model_spacing,
        transpose=(0, 1, 2),
        crop_to_nonzero=False,
        normalization=Normalization("window", lo, hi),
        resampling=Resampling(data_order=1, logits_order=1, order_z=1),
        inference=Inference("whole", ()),
        in_channels=SPEC.network.in_channels,
        source={"kind": "medseg", "spec_version": SPEC.version},
        pipeline="medseg",
    )


def read_card(path: Path) -> ModelCard:
    """The card stored at ``path``."""
    if not path.is_file():
        raise ArtifactError(f"{path}: no model card (expected the card.json an importer writes)")
    return ModelCard.from_json(path.read_text(), str(path))
