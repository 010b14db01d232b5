"""Server tier: the real tritonserver (cpu flavor; ``MEDSEG_TEST_FLAVOR=cuda`` the cuda flavor on a GPU)
on free ports, driven through the client.

Provenance and measurements in the findings, labels on the input grid, the served result equal to the
in-process reference pipeline, the CLI end to end; the accuracy bars are in test_accuracy.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medseg.accuracy.metrics import ACCEPTANCE, AGREEMENT_DICE, dice
from medseg.model.network import weights_info
from medseg.synth.phantom import generate
from medseg_client.client import SegmentationClient
from medseg_client.errors import ServerError, StudyError
from medseg_client.io.studies import write_phantom
from medseg_client.spec import SPEC
from tests.helpers import CUDA_REASON, TEST_FLAVOR, UNSEEN_SEEDS, cuda_available, dciodvfy_errors, needs_dciodvfy

pytestmark = pytest.mark.server
TUMOR = SPEC.label("liver_tumor").value


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    with SegmentationClient(server.grpc_url) as c:
        c.wait_until_ready(60)
        yield c


def test_the_served_model_matches_the_spec(client: SegmentationClient) -> None:
    meta = client.check_model()
    assert meta["name"] == SPEC.ensemble.name


def test_findings_carry_provenance_and_measurements(served_unseen: dict) -> None:  # type: ignore[type-arg]
    ph, result = served_unseen[UNSEEN_SEEDS[0]]
    f = result.findings
    assert f["model"]["weights_sha256"] == weights_info().sha256
    assert f["model"]["ensemble"] == SPEC.ensemble.name
    assert f["study_grid"]["shape_zyx"] == list(ph.ct.shape)
    assert f["liver"]["volume_ml"] == pytest.approx(float((result.labels > 0).sum()) * np.prod(ph.spacing) / 1000, rel=1e-3)
    for t in f["tumors"]:
        assert {"volume_ml", "longest_axial_diameter_mm", "centroid_voxel_zyx", "bbox_voxel_zyx", "mean_hu"} <= t.keys()


def test_the_served_result_equals_the_in_process_reference(served_unseen: dict) -> None:  # type: ignore[type-arg]
    from medseg.model.pipeline import ReferencePipeline

    reference = ReferencePipeline()
    ph, result = served_unseen[UNSEEN_SEEDS[0]]
    labels, findings = reference(ph.ct, ph.spacing)
    for lab in SPEC.labels[1:]:
        assert dice(result.labels == lab.value, labels == lab.value) >= AGREEMENT_DICE, lab.name
    if TEST_FLAVOR == "cpu":  # the same steps: the same numbers
        assert findings["liver"] == result.findings["liver"]
    else:  # FP16 on the GPU: the organ's volume within 1%
        assert result.findings["liver"]["volume_ml"] == pytest.approx(findings["liver"]["volume_ml"], rel=0.01)


def test_a_bad_study_is_refused_and_the_server_stays_ready(client: SegmentationClient, server: Any) -> None:
    import tritonclient.grpc as g

    ct = np.zeros((1, 20, 64, 64), np.int16)
    inputs = [g.InferInput("CT", list(ct.shape), "INT16"), g.InferInput("SPACING", [1, 3], "FP32")]
    inputs[0].set_data_from_numpy(ct)
    inputs[1].set_data_from_numpy(np.array([[2.0, float("nan"), 1.0]], np.float32))
    raw = g.InferenceServerClient(server.grpc_url)
    with pytest.raises(Exception, match=r"INVALID_ARGUMENT.*spacing along y"):
        raw.infer(SPEC.ensemble.name, inputs)
    with pytest.raises(StudyError, match="spacing"):
        client.segment(ct[0], (0.0, 1.0, 1.0))
    assert server.ready()


@pytest.fixture(scope="module")
def segmented_series(server: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`medseg segment` on an unseen phantom's DICOM series, once: the folder holding study/ and result/, and the
    finished command."""
    tmp_path = tmp_path_factory.mktemp("segment-command")
    ph = generate(UNSEEN_SEEDS[1], num_slices=80, slice_thickness=4.0)
    write_phantom(ph, tmp_path / "study", "dicom")
    r = subprocess.run([sys.executable, "-m", "medseg_client.cli", "segment", "--url", server.grpc_url,
                        str(tmp_path / "study" / "dicom"), "--out", str(tmp_path / "result")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return tmp_path, r


@needs_dciodvfy
def test_the_segment_commands_seg_passes_dciodvfy(segmented_series: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    assert dciodvfy_errors(segmented_series[0] / "result" / "seg.dcm") == []


def test_segment_command_writes_labels_seg_preview_and_findings(
        server: Any, segmented_series: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp_path, r = segmented_series
    out = tmp_path / "result"
    labels = nib.load(str(out / "labels.nii.gz"))
    truth = nib.load(str(tmp_path / "study" / "labels_truth.nii.gz"))
    assert labels.shape == truth.shape
    np.testing.assert_allclose(labels.affine, truth.affine, atol=1e-3)
    from PIL import Image

    assert (out / "seg.dcm").exists()
    with Image.open(out / "preview.png") as im:
        assert im.format == "PNG" and im.width >= 2 * im.height // 2
    doc = json.loads((out / "findings.json").read_text())
    assert doc["model"]["weights_sha256"] == weights_info().sha256
    # no patient identifier in what we print, log or write as findings
    import pydicom

    src = pydicom.dcmread(next((tmp_path / "study" / "dicom").iterdir()))
    identifiers = [str(src.PatientName), str(src.PatientID), str(src.AccessionNumber)]
    texts = {"stdout": r.stdout, "stderr": r.stderr, "server log": server.log_file.read_text(),
             "findings.json": (out / "findings.json").read_text()}
    leaks = [(where, ident) for where, text in texts.items() for ident in identifiers if ident in text]
    assert leaks == []
    assert {"request_s", "preprocess_s", "segmenter_s", "postprocess_s", "total_s"} <= doc["timings_s"].keys()
    assert doc["findings"]["status"]["code"] == "ok"
    assert dice(np.asanyarray(labels.dataobj) > 0, np.asanyarray(truth.dataobj) > 0) >= ACCEPTANCE.liver_dice


def test_shared_memory_transport_gives_the_same_result_and_leaves_nothing_behind(
        client: SegmentationClient, server: Any) -> None:
    import tritonclient.grpc as grpcclient

    ph = generate(UNSEEN_SEEDS[0], num_slices=60, slice_thickness=5.0)
    with SegmentationClient(server.grpc_url, shared_memory=True) as shm_client:
        got = shm_client.segment(ph.ct, ph.spacing)
    want = client.segment(ph.ct, ph.spacing)
    assert np.array_equal(got.labels, want.labels) and got.findings == want.findings
    regions = grpcclient.InferenceServerClient(server.grpc_url).get_system_shared_memory_status(as_json=True).get("regions", {})
    assert not [name for name in regions if name.startswith("medseg-")], "the client's regions must be unregistered"
    assert not [p for p in Path("/dev/shm").glob("medseg-*")]


def _cuda_python() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("cuda.bindings") is not None
    except ModuleNotFoundError:  # no ``cuda`` namespace at all
        return False


@pytest.mark.gpu
def test_cuda_shared_memory_gives_the_same_result_and_leaves_nothing_behind(client: SegmentationClient,
                                                                           server: Any) -> None:
    import tritonclient.grpc as grpcclient

    if not cuda_available():
        pytest.skip(CUDA_REASON)
    if not _cuda_python():
        pytest.skip("the client's CUDA shared memory needs cuda-python (perf/gpu_host/stage.sh stages cuda-bindings)")
    ph = generate(UNSEEN_SEEDS[0], num_slices=60, slice_thickness=5.0)
    with SegmentationClient(server.grpc_url, shared_memory="cuda") as cuda_client:
        got = cuda_client.segment(ph.ct, ph.spacing)
    want = client.segment(ph.ct, ph.spacing)
    assert np.array_equal(got.labels, want.labels) and got.findings == want.findings
    regions = grpcclient.InferenceServerClient(server.grpc_url).get_cuda_shared_memory_status(as_json=True).get("regions", {})
    assert not [name for name in regions if name.startswith("medseg-")], "the client's regions must be unregistered"


def test_cuda_shared_memory_without_cuda_python_is_refused_in_one_line(server: Any) -> None:
    if _cuda_python():
        pytest.skip("cuda-python is installed here: the GPU test above uses it")
    ph = generate(UNSEEN_SEEDS[0], num_slices=20, slice_thickness=5.0)
    with SegmentationClient(server.grpc_url, shared_memory="cuda") as cuda_client, \
            pytest.raises(ServerError, match=r"CUDA shared memory needs the cuda-python package") as caught:
        cuda_client.segment(ph.ct, ph.spacing)
    assert "\n" not in str(caught.value)


def test_the_same_study_twice_gives_byte_identical_labels_and_names_its_model(client: SegmentationClient) -> None:
    ph = generate(UNSEEN_SEEDS[1], num_slices=60, slice_thickness=5.0)
    first, second = client.segment(ph.ct, ph.spacing), client.segment(ph.ct, ph.spacing)
    assert first.labels.tobytes() == second.labels.tobytes()
    assert first.findings == second.findings
    model = first.findings["model"]
    assert model["ensemble"] == SPEC.ensemble.name and model["version"] == SPEC.segmenter.version
    assert model["spec_version"] == SPEC.version
    assert model["weights_sha256"] == weights_info().sha256 and len(model["onnx_sha256"]) == 64
