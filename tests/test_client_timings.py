"""Where a study's time went, per request: the server's own measure of its postprocess, and Triton's statistics for
the other steps only when they show this request alone (another client in flight would make them its time too)."""

from __future__ import annotations

from typing import Any

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
