"""Client resilience: retries happen only for a server that is unreachable, too slow or still loading
its models, never for a refused study or a server-side failure. (The batch under repeated server
kills is still to come: issue 7.)"""

from __future__ import annotations

import pytest

from medseg.errors import MedsegError, StudyError


@pytest.mark.parametrize(("status", "message", "retried"), [
    ("StatusCode.UNAVAILABLE", "failed to connect", True), ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", True),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'ct_liver' has no available versions", True),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'other' is not found", False),
    ("StatusCode.INVALID_ARGUMENT", "CT volume must be 3-D", False), ("StatusCode.INTERNAL", "Stub process is not healthy", False),
])
def test_only_an_unreachable_slow_or_loading_server_is_retried(status: str, message: str, retried: bool) -> None:
    from medseg_client.client import ServerUnavailableError, _raise_from
    from tritonclient.utils import InferenceServerException

    with pytest.raises(MedsegError) as e:
        _raise_from(InferenceServerException(message, status=status), "segmenting")
    assert isinstance(e.value, ServerUnavailableError) == retried
    assert isinstance(e.value, StudyError) == (status == "StatusCode.INVALID_ARGUMENT")
