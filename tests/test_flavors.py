"""The cuda flavor: its steps agree with the cpu flavor's, called directly and through the real server.

On this machine (no GPU) the cuda flavor's code runs on torch's CPU device: the same configs with
KIND_CPU instances, in the real tritonserver, tensors crossing by DLPack. On a GPU host the gpu-marked
test serves the committed configs (KIND_GPU) and asks for the same agreement.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from medseg.accuracy.metrics import AGREEMENT_DICE, dice
from medseg.model.pipeline import dali_installed
from medseg.ops.preprocess import preprocess_reference
from medseg.paths import MODEL_REPOSITORY
from medseg.serving import configgen, flavors
from medseg.synth.phantom import generate
from medseg_client.errors import ArtifactError, ServerError, StudyError
from medseg_client.protocol import SERVER_TIMINGS_KEY
from medseg_client.spec import SPEC
from tests.helpers import CUDA_REASON, TEST_FLAVOR, UNSEEN_SEEDS, artifacts_missing, cuda_available


def _args(model: str, flavor: str, kind: str = "CPU") -> dict[str, Any]:
    """What Triton hands a python model's ``initialize`` for a generated config, its instances of ``kind``."""
    configs = {**configgen.config_dicts(), **configgen.cuda_flavor("KIND_" + kind)}
    config = configs[f"{model}/configs/{flavor}.pbtxt"]
    params = {p["key"]: p["value"] for p in config.get("parameters", [])}
    return {"model_config": json.dumps({"name": model, "parameters": params}), "model_instance_kind": kind,
            "model_instance_device_id": "0", "model_repository": str(MODEL_REPOSITORY / model), "model_version": "1"}


@pytest.fixture(scope="module")
def study() -> tuple[np.ndarray, np.ndarray]:
    ph = generate(UNSEEN_SEEDS[1], num_slices=48, slice_thickness=5.0)
    return ph.ct, np.asarray(ph.spacing, np.float32)


def test_every_cuda_config_keeps_gpu_tensors_and_runs_torch() -> None:
    for rel, config in configgen.cuda_flavor().items():
        params = {p["key"]: p["value"]["string_value"] for p in config["parameters"]}
        assert params["engine"] == "torch" and params["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no", rel
        assert config["instance_group"][0]["kind"] == "KIND_GPU", rel
        assert config["backend"] == "python", rel


def test_an_unknown_engine_is_refused_with_the_ones_there_are() -> None:
    args = _args(SPEC.preprocess.name, "cpu")
    args["model_config"] = json.dumps({"parameters": {"engine": {"string_value": "tensorflow"}}})
    with pytest.raises(ArtifactError, match=r"engine must be one of \['dali', 'torch'\], got 'tensorflow'"):
        flavors.preprocess_step(args)


def test_a_model_refuses_to_load_under_numpy_2_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(np, "__version__", "2.5.2")
    with pytest.raises(ServerError, match=r"numpy 2.5.2 .* needs numpy<2 \(numpy 2 outputs arrive empty\)"):
        flavors.preprocess_step(_args(SPEC.preprocess.name, "cuda"))


@pytest.mark.skipif(cuda_available(), reason="this machine has a GPU: the refusal cannot be shown")
def test_a_gpu_instance_without_a_gpu_is_refused_with_the_reason() -> None:
    with pytest.raises(ServerError, match="CUDA device"):
        flavors.preprocess_step(_args(SPEC.preprocess.name, "cuda", kind="GPU"))


@pytest.mark.skipif(not dali_installed(), reason="NVIDIA DALI not installed (the cpu flavor's preprocessing)")
def test_torch_preprocessing_step_equals_the_dali_step(study: tuple[np.ndarray, np.ndarray]) -> None:
    ct, spacing = study
    dali = flavors.preprocess_step(_args(SPEC.preprocess.name, "cpu"))
    torch_step = flavors.preprocess_step(_args(SPEC.preprocess.name, "cuda"))
    assert (dali.engine, torch_step.engine) == ("dali", "torch")
    want = dali.handler({"CT": ct, "SPACING": spacing})
    got = torch_step.handler({"CT": torch.from_numpy(ct), "SPACING": torch.from_numpy(spacing)})
    assert np.array_equal(got["GRID"], want["GRID"])
    np.testing.assert_allclose(got["IMAGE"].numpy(), want["IMAGE"], atol=1e-4)


def test_torch_preprocessing_step_refuses_a_bad_study_before_any_work() -> None:
    step = flavors.preprocess_step(_args(SPEC.preprocess.name, "cuda"))
    with pytest.raises(StudyError, match="int16"):
        step.handler({"CT": torch.zeros((40, 64, 64), dtype=torch.float32), "SPACING": torch.tensor([2.0, 1.0, 1.0])})
    with pytest.raises(StudyError, match="spacing along y"):
        step.handler({"CT": torch.zeros((40, 64, 64), dtype=torch.int16), "SPACING": torch.tensor([2.0, float("nan"), 1.0])})


def test_torch_segmenter_and_postprocess_steps_agree_with_the_cpu_flavor(study: tuple[np.ndarray, np.ndarray]) -> None:
    reason = artifacts_missing()
    if reason:
        pytest.fail(reason)
    ct, spacing = study
    padded, grid = preprocess_reference(ct, spacing)  # DALI's output, as test_preprocess shows
    image = {"IMAGE": padded, "GRID": np.asarray(grid, np.int64)}
    onnx = flavors.segmenter_step(_args(SPEC.segmenter.name, "cpu")).handler({"IMAGE": image["IMAGE"]})
    torch_out = flavors.segmenter_step(_args(SPEC.segmenter.name, "cuda")).handler(
        {"IMAGE": torch.from_numpy(image["IMAGE"])})
    assert list(onnx) == list(torch_out) == [t.name for t in SPEC.segmenter.outputs]
    for t in SPEC.segmenter.outputs:  # the spec's dtypes, the padded grid
        assert onnx[t.name].dtype == torch_out[t.name].numpy().dtype == t.numpy_dtype
        assert onnx[t.name].shape[-3:] == image["IMAGE"].shape[-3:]
    # the export's own criterion: probabilities within 1e-3, the same labels
    labels, probabilities = (onnx[t.name] for t in SPEC.segmenter.outputs)
    got_labels, got_probabilities = (torch_out[t.name].numpy() for t in SPEC.segmenter.outputs)
    assert np.abs(got_probabilities.astype(np.float32) - probabilities.astype(np.float32)).max() <= 1e-3
    assert (got_labels == labels).mean() >= 0.9999

    inputs = {"CT": ct, "SPACING": spacing, **onnx, "GRID": image["GRID"]}
    want = flavors.postprocess_step(_args(SPEC.postprocess.name, "cpu")).handler(inputs)
    got = flavors.postprocess_step(_args(SPEC.postprocess.name, "cuda")).handler(
        {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    assert isinstance(got["LABELS"], np.ndarray) and got["LABELS"].dtype == np.uint8  # only labels leave the device
    assert np.array_equal(got["LABELS"], want["LABELS"])
    got_doc, want_doc = json.loads(got["FINDINGS"][0]), json.loads(want["FINDINGS"][0])
    for doc in (got_doc, want_doc):  # each names its own time, the rest is the same
        assert doc.pop(SERVER_TIMINGS_KEY)["postprocess_s"] >= 0
    assert got_doc == want_doc
    assert (want["LABELS"] == 1).any()


# ---------------------------------------------------------------- through the real server


@pytest.fixture(scope="module", params=[
    pytest.param("KIND_CPU", marks=pytest.mark.server, id="cuda-flavor-code-on-cpu"),
    pytest.param("KIND_GPU", marks=[pytest.mark.server, pytest.mark.gpu], id="cuda-flavor-on-gpu"),
])
def cuda_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from medseg.serving.server import EmbeddedServer, ServerOptions

    if request.param == "KIND_GPU" and not cuda_available():
        pytest.skip(CUDA_REASON)
    reason = artifacts_missing()
    if reason:
        pytest.fail(reason)
    tmp = tmp_path_factory.mktemp("cuda")
    # without a GPU: the cuda configs with KIND_CPU instances, in a copy of the repository
    repo = (MODEL_REPOSITORY if request.param == "KIND_GPU"
            else configgen.repository_variant(tmp / "model_repository", configgen.cuda_flavor(request.param)))
    options = ServerOptions(flavor="cuda", grpc_port=0, http_port=0, metrics_port=0, model_repository=repo,
                            extra_args=flavors.cuda_memory_pool_args())
    with EmbeddedServer(options, log_file=tmp / "tritonserver.log") as s:
        yield s


def _cpu_flavor(ct: np.ndarray, spacing: tuple[float, float, float],
                request: pytest.FixtureRequest) -> tuple[np.ndarray, dict[str, Any]]:
    """The cpu flavor's labels and findings: served by the session's server where it serves the cpu flavor;
    otherwise (``MEDSEG_TEST_FLAVOR=cuda``, a GPU host without DALI) its steps in-process, which
    test_server shows equal to the served cpu flavor (numpy preprocessing where DALI is missing)."""
    from medseg.model.pipeline import ReferencePipeline
    from medseg.model.provenance import read_provenance
    from medseg_client.client import SegmentationClient

    if TEST_FLAVOR == "cpu" and dali_installed():
        with SegmentationClient(request.getfixturevalue("server").grpc_url) as c:
            result = c.segment(ct, spacing)
        return result.labels, result.findings
    labels, findings = ReferencePipeline()(ct, spacing)
    return labels, {"model": read_provenance(MODEL_REPOSITORY), **findings}


def test_the_cuda_flavor_served_matches_the_cpu_flavor(cuda_server: Any, request: pytest.FixtureRequest) -> None:
    from medseg_client.client import SegmentationClient

    ph = generate(UNSEEN_SEEDS[2], num_slices=120, slice_thickness=2.5)
    with SegmentationClient(cuda_server.grpc_url) as c:
        got = c.segment(ph.ct, ph.spacing)
    want_labels, want_findings = _cpu_flavor(ph.ct, ph.spacing, request)
    assert got.labels.shape == ph.ct.shape
    for label in SPEC.labels:
        if label.value and (want_labels == label.value).any():
            figure = dice(got.labels == label.value, want_labels == label.value)
            print(f"{request.node.callspec.id}: {label.name} Dice vs the cpu flavor {figure:.4f}")
            assert figure >= AGREEMENT_DICE, label.name
    assert len(got.findings["tumors"]) == len(want_findings["tumors"])
    assert got.findings["model"] == want_findings["model"]


def test_studies_in_flight_together_each_get_their_own_result(cuda_server: Any, request: pytest.FixtureRequest) -> None:
    """GPU outputs are copied after ``execute`` returns: with several requests in flight each study must
    still get exactly the labels it gets alone (studies of different sizes, so any cross-talk shows). On the GPU
    9 requests, 6 in flight (where the race was seen); the same code on torch's CPU device 5, 3 in flight (each
    request there takes seconds, not milliseconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from medseg_client.client import SegmentationClient

    studies = [generate(seed, num_slices=n, slice_thickness=5.0) for seed, n in zip(UNSEEN_SEEDS, (40, 52, 64), strict=True)]
    with SegmentationClient(cuda_server.grpc_url) as c:
        alone = [c.segment(ph.ct, ph.spacing).labels for ph in studies]

    def segment(i: int) -> np.ndarray:
        with SegmentationClient(cuda_server.grpc_url) as c:
            return c.segment(studies[i].ct, studies[i].spacing).labels

    on_gpu = request.node.callspec.params["cuda_server"] == "KIND_GPU"
    order = [i % len(studies) for i in range(9 if on_gpu else 5)]
    with ThreadPoolExecutor(max_workers=6 if on_gpu else 3) as pool:
        together = list(pool.map(segment, order))
    assert [np.array_equal(got, alone[i]) for got, i in zip(together, order, strict=True)] == [True] * len(order)
