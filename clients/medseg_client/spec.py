"""The one spec of medseg: labels, grids, intensity window, tensors, bounds, names and versions.

Every ``config.pbtxt``, the DALI pipeline, the export profiles, the client and the tests read their
numbers from here; nothing else in the repository writes a shape, label or window literal.
Array axes are always (z, y, x) = (slice, row, column); spacings are in millimetres in that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM): value, coding scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Label:
    """One segmentation class: its value in label volumes, names, overlay colour and DICOM SEG coding."""

    value: int
    name: str
    display: str
    color: tuple[int, int, int]
    category: Code | None = None  # Segmented Property Category
    type: Code | None = None  # Segmented Property Type
    region: Code | None = None  # Anatomic Region, where the type alone does not say it


@dataclass(frozen=True)
class Tensor:
    """A model input or output as Triton sees it (dims exclude the batch dimension)."""

    name: str
    dtype: str  # Triton data type without the TYPE_ prefix: INT16, FP32, FP16, UINT8, INT64, STRING
    dims: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_NUMPY_DTYPES[self.dtype])


_NUMPY_DTYPES: dict[str, type | str] = {
    "INT16": np.int16,
    "FP32": np.float32,
    "FP16": np.float16,
    "UINT8": np.uint8,
    "INT64": np.int64,
    "STRING": np.object_,
}


@dataclass(frozen=True)
class ModelIO:
    """The name, version and tensors of one model in the repository."""

    name: str
    version: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def input(self, name: str) -> Tensor:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> Tensor:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class Network:
    """The segmenter's architecture (a MONAI 3-D UNet) and its export settings."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    in_channels: int = 1
    onnx_opset: int = 17
    # batch norm: fixed statistics at inference, so a liver is segmented the same whatever else the field of view
    # holds (instance norm's statistics over a whole study differ from a training patch's)
    norm: str = "batch"

    @property
    def size_divisor(self) -> int:
        """Every spatial size fed to the network must be a multiple of this."""
        return math.prod(self.strides)


@dataclass(frozen=True)
class Plausibility:
    """What a reported liver and its tumors must satisfy: nothing is reported where the scan cannot show it
    (``medseg.ops.anatomy``, ``medseg.ops.lesions``, ``medseg.ops.postprocess``)."""

    liver_min_ml: float = 200.0  # less liver in view than this: not reported (not in view, or mostly cut off)
    liver_max_ml: float = 5000.0  # an adult liver holds 1-2 L; severe hepatomegaly reaches 4-5 L
    liver_hu: tuple[float, float] = (-30.0, 200.0)  # mean HU of the parenchyma (severe steatosis .. arterial/portal)
    liver_min_right_fraction: float = 0.5  # of the organ on the patient's right of the trunk's midline
    liver_min_confidence: float = 0.8  # mean probability of the predicted class over the organ
    # operating point of the tumor confidence, chosen on held-out phantoms from the FROC curve:
    # `python -m export.froc` writes it with its curve to export/weights/operating_point.json (a test holds them equal)
    tumor_threshold: float = 0.862


@dataclass(frozen=True)
class Spec:
    """Everything a component needs to agree with the others."""

    labels: tuple[Label, ...]
    model_spacing: tuple[float, float, float]  # (z, y, x) mm
    hu_window: tuple[float, float]  # clipped to this range, then scaled to 0..1
    network: Network
    # bounds on what the ensemble accepts (raw study) and what the segmenter sees (model grid)
    min_input_shape: tuple[int, int, int]
    max_input_shape: tuple[int, int, int]
    max_input_voxels: int
    spacing_range: tuple[float, float]  # mm, every axis
    max_model_grid: tuple[int, int, int]
    opt_model_grid: tuple[int, int, int]  # TensorRT optimisation profile's "opt"
    tile_voxels: int  # model-grid voxels above which CPU inference tiles along z
    tile_overlap: int  # slices of overlap between tiles (multiple of the size divisor)
    min_tumor_volume_ml: float  # smaller tumor components are dropped as noise
    max_reported_tumors: int  # findings list the largest ones; the rest are counted
    plausibility: Plausibility
    ensemble: ModelIO
    preprocess: ModelIO
    segmenter: ModelIO
    postprocess: ModelIO
    version: str = "1.2.0"  # 1.2: the segmenter emits labels and probabilities, no logits
    max_batch_size: int = 1

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def label(self, name: str) -> Label:
        return next(lab for lab in self.labels if lab.name == name)

    @property
    def tumor_threshold(self) -> float:
        return self.plausibility.tumor_threshold

    @property
    def min_model_grid(self) -> tuple[int, int, int]:
        d = self.network.size_divisor
        return (d, d, d)


# the segmenter's PROBABILITIES channels: the tumor class's softmax probability (a lesion's confidence) and the
# predicted class's (the organ's confidence); the head computes them from the float32 logits
PROBABILITY_CHANNELS = ("tumor", "predicted_class")


def _build() -> Spec:
    liver = Code("10200004", "SCT", "Liver")
    labels = (
        Label(0, "background", "Background", (0, 0, 0)),
        Label(1, "liver", "Liver", (60, 200, 90), Code("91723000", "SCT", "Anatomical Structure"), liver),
        Label(2, "liver_tumor", "Liver tumor", (235, 60, 50),
              Code("49755003", "SCT", "Morphologically Abnormal Structure"), Code("108369006", "SCT", "Neoplasm"), liver),
    )
    net = Network()
    ct = Tensor("CT", "INT16", (-1, -1, -1))
    spacing = Tensor("SPACING", "FP32", (3,))
    image = Tensor("IMAGE", "FP32", (net.in_channels, -1, -1, -1))
    grid = Tensor("GRID", "INT64", (3,))
    # what leaves the segmenter (its head fuses the argmax and the softmax): uint8 labels on the padded model grid
    # and, in float16, the two probabilities the judging reads (PROBABILITY_CHANNELS), a third of float32 logits
    model_labels = Tensor("MODEL_LABELS", "UINT8", (-1, -1, -1))
    probabilities = Tensor("PROBABILITIES", "FP16", (len(PROBABILITY_CHANNELS), -1, -1, -1))
    labels_t = Tensor("LABELS", "UINT8", (-1, -1, -1))
    findings = Tensor("FINDINGS", "STRING", (1,))
    return Spec(
        labels=labels,
        model_spacing=(2.0, 1.5, 1.5),
        hu_window=(-175.0, 250.0),
        network=net,
        min_input_shape=(1, 16, 16),
        max_input_shape=(2048, 1024, 1024),
        max_input_voxels=512 * 512 * 1200,
        spacing_range=(0.1, 10.0),
        max_model_grid=(512, 384, 384),
        opt_model_grid=(160, 256, 256),
        tile_voxels=320 * 288 * 288,  # ~4 GB peak in ONNX Runtime; tiles cost ~30% more compute, so only past this
        tile_overlap=32,
        min_tumor_volume_ml=0.1,
        max_reported_tumors=50,
        plausibility=Plausibility(),
        ensemble=ModelIO("ct_liver", 1, (ct, spacing), (labels_t, findings)),
        preprocess=ModelIO("ct_preprocess", 1, (ct, spacing), (image, grid)),
        segmenter=ModelIO("ct_segmenter", 1, (image,), (model_labels, probabilities)),
        postprocess=ModelIO("ct_postprocess", 1, (ct, spacing, model_labels, probabilities, grid), (labels_t, findings)),
    )


SPEC = _build()
# the label values the code tests voxels against (each module imports these, none writes its own)
LIVER, TUMOR = SPEC.label("liver").value, SPEC.label("liver_tumor").value


def model_grid_shape(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[int, int, int]:
    """The (z, y, x) size of a study resampled to the model spacing: round-half-up of its extent.

    This is the rule DALI's resize applies to a fractional size; the reference pipeline and the
    bounds checks use it too, so that all agree on the grid.
    """
    out = [
        math.floor(n * s / m + 0.5) for n, s, m in zip(shape, spacing, SPEC.model_spacing, strict=True)
    ]
    return (max(out[0], 1), max(out[1], 1), max(out[2], 1))


def padded_shape(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The model grid padded up to the network's size divisor."""
    d = SPEC.network.size_divisor
    return (-(-grid[0] // d) * d, -(-grid[1] // d) * d, -(-grid[2] // d) * d)
