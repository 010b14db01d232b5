"""The embedded server's options are the caller's: ports of 0 are chosen on the server's own copy."""

from __future__ import annotations

import dataclasses

import pytest

from medseg.serving.server import EmbeddedServer, ServerOptions


def test_free_ports_are_chosen_on_the_servers_copy_and_the_callers_options_stay_as_given() -> None:
    given = ServerOptions(grpc_port=0, http_port=0, metrics_port=0)
    server = EmbeddedServer(given)  # not started
    assert (given.grpc_port, given.http_port, given.metrics_port) == (0, 0, 0)
    chosen = (server.options.grpc_port, server.options.http_port, server.options.metrics_port)
    assert all(port > 0 for port in chosen) and len(set(chosen)) == 3
    assert server.grpc_url.endswith(f":{server.options.grpc_port}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.grpc_port = 1  # type: ignore[misc]
