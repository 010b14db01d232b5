"""Where a study's time went, per request: the server's own measure of its postprocess, and Triton's statistics for
the other steps only when they show this request alone (another client in flight would make them its time too)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from medseg.synth.phantom import generate
from medseg_client.client import SegmentationClient
from medseg_client.protocol import SERVER_TIMINGS_KEY
from medseg_client.spec import SPEC
from tests.helpers import UNSEEN_SEEDS

PRE, SEG = SPEC.preprocess.name, SPEC.segmenter.name


def test_statistics_give_a_steps_time_only_when_this_request_was_its_only_one() -> None:
    before = {PRE: (10.0, 1e9), SEG: (10.0, 5e9)}
    alone = {PRE: (11.0, 1.5e9), SEG: (11.0, 7e9)}
    assert SegmentationClient._stage_times(before, alone) == {"preprocess_s": 0.5, "segmenter_s": 2.0}
    crowded = {PRE: (12.0, 2e9), SEG: (11.0, 7e9)}  # another client's study went through the preprocess too
    assert SegmentationClient._stage_times(before, crowded) == {"segmenter_s": 2.0}
    assert SegmentationClient._stage_times({}, alone) == {}  # statistics closed to this client


@pytest.mark.server
def test_the_servers_postprocess_time_comes_with_the_result_not_in_its_findings(server: Any) -> None:
    ph = generate(UNSEEN_SEEDS[0], num_slices=24, slice_thickness=5.0)
    with SegmentationClient(server.grpc_url) as client:
        client.wait_until_ready(60)
        result = client.segment(ph.ct, ph.spacing)
    assert SERVER_TIMINGS_KEY not in result.findings
    t = result.timings_s
    assert {"request_s", "preprocess_s", "segmenter_s", "postprocess_s"} <= t.keys()  # alone on this server
    assert 0 < t["postprocess_s"] < t["request_s"] and t["preprocess_s"] + t["segmenter_s"] < t["request_s"]


@pytest.mark.parametrize("sizes", [[0], [1, 127, 128], [300 * 1024, 3]])
def test_a_request_written_once_parses_as_the_generated_codes_request(sizes: list[int]) -> None:
    """wire_request appends each tensor as one more raw_input_contents field (varint lengths of 1..3 bytes here):
    the bytes parse as the same request, every tensor's bytes in order."""
    from tritonclient.grpc import service_pb2

    from medseg_client.client import wire_request

    rng = np.random.default_rng(0)
    arrays = [rng.integers(-1024, 3071, size=n).astype(np.int16) for n in sizes]
    request = service_pb2.ModelInferRequest(model_name="ct_liver", id="abc")
    request.inputs.add().name = "CT"
    parsed = service_pb2.ModelInferRequest.FromString(wire_request(request, arrays))
    assert parsed.model_name == "ct_liver" and parsed.id == "abc" and [t.name for t in parsed.inputs] == ["CT"]
    assert list(parsed.raw_input_contents) == [a.tobytes() for a in arrays]
