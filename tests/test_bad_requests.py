"""500 mutated inference requests straight to Triton's gRPC API: every one is refused with
INVALID_ARGUMENT and a message, the server stays live and ready, and its memory stays bounded."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from medseg_client.spec import SPEC

pytestmark = pytest.mark.server
Raw = tuple[str, str, list[int], bytes]  # name, datatype, shape, raw contents
_NP = {"INT16": np.int16, "FP32": np.float32, "INT32": np.int32, "UINT8": np.uint8, "FP16": np.float16, "INT64": np.int64}


def _valid(rng: np.random.Generator) -> list[Raw]:
    shape = [1, int(rng.integers(16, 40)), 64, 64]
    ct = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    return [("CT", "INT16", shape, ct.tobytes()), ("SPACING", "FP32", [1, 3], np.array([[5.0, 6.0, 6.0]], np.float32).tobytes())]


def _with(inputs: list[Raw], name: str, **change: Any) -> list[Raw]:
    out = []
    for n, dt, shape, raw in inputs:
        if n == name:
            dt, shape, raw = change.get("dtype", dt), change.get("shape", shape), change.get("raw", raw)
        out.append((n, dt, shape, raw))
    return out


def _spacing(values: list[float]) -> bytes:
    return np.asarray(values, np.float32).reshape(1, -1).tobytes()


def _zeros(shape: list[int], dtype: str = "INT16") -> bytes:
    return np.zeros(shape, _NP[dtype]).tobytes()


def _ct_rank(x: list[Raw], r: np.random.Generator) -> list[Raw]:
    z = x[0][2][1]
    shape = [1, z, 64 * 64] if r.random() < 0.5 else [1, z, 64, 64, 1]
    return _with(x, "CT", shape=shape, raw=_zeros(shape))


def _ct_zero_dim(x: list[Raw], r: np.random.Generator) -> list[Raw]:
    shape = list(x[0][2])
    shape[1 + int(r.integers(3))] = 0
    return _with(x, "CT", shape=shape, raw=b"")


def _ct_dtype(x: list[Raw], r: np.random.Generator) -> list[Raw]:
    dtype = str(r.choice(["FP32", "INT32", "UINT8", "FP16", "INT64"]))
    return _with(x, "CT", dtype=dtype, raw=_zeros(x[0][2], dtype))


def _spacing_value(x: list[Raw], r: np.random.Generator) -> list[Raw]:
    values = [5.0, 6.0, 6.0]
    values[int(r.integers(3))] = float(r.choice([0.0, -1.0, math.nan, math.inf, -math.inf, 1e9, 1e-9]))
    return _with(x, "SPACING", raw=_spacing(values))


def _spacing_length(x: list[Raw], r: np.random.Generator) -> list[Raw]:
    n = int(r.choice([1, 2, 4]))
    return _with(x, "SPACING", shape=[1, n], raw=_spacing([1.0] * n))


def _missing_input(x: list[Raw], r: np.random.Generator) -> list[Raw]:
    dropped = str(r.choice(["CT", "SPACING"]))
    return [i for i in x if i[0] != dropped]


MUTATIONS: dict[str, Callable[[list[Raw], np.random.Generator], list[Raw]]] = {
    "ct dtype": _ct_dtype,
    "ct rank": _ct_rank,
    "ct zero dim": _ct_zero_dim,
    "ct negative dim": lambda x, r: _with(x, "CT", shape=[1, -int(r.integers(1, 100)), 64, 64]),
    "ct huge dims": lambda x, r: _with(x, "CT", shape=[1, int(r.integers(10**5, 10**7)), 512, 512]),
    "ct byte size off by one": lambda x, r: _with(x, "CT", raw=x[0][3][:-1] if r.random() < 0.5 else x[0][3] + b"\0"),
    "ct below the minimum size": lambda x, r: _with(x, "CT", shape=[1, 4, 8, 8], raw=_zeros([1, 4, 8, 8])),
    "batch of two": lambda x, r: [(n, dt, [2, *s[1:]], raw * 2) for n, dt, s, raw in x],
    "missing input": _missing_input,
    "extra input": lambda x, r: [*x, (str(r.choice(["FOO", "LABELS", "IMAGE"])), "FP32", [1, 3], b"\0" * 12)],
    "spacing value": _spacing_value,
    "spacing length": _spacing_length,
    "spacing dtype": lambda x, r: _with(x, "SPACING", dtype="FP64", raw=np.ones((1, 3), np.float64).tobytes()),
    "study extent": lambda x, r: _with(x, "SPACING", raw=_spacing([0.1] * 3 if r.random() < 0.5 else [9.9] * 3)),
}


def _request(inputs: list[Raw]) -> Any:
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=SPEC.ensemble.name)
    for name, dtype, shape, raw in inputs:
        t = req.inputs.add()
        t.name, t.datatype = name, dtype
        t.shape.extend(shape)
        req.raw_input_contents.append(raw)
    for out in SPEC.ensemble.outputs:
        req.outputs.add().name = out.name
    return req


def test_500_mutated_requests_are_each_refused_and_the_server_stays_up(server: Any) -> None:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    assert server._proc is not None
    channel = grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", -1),
                                                              ("grpc.max_receive_message_length", -1)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(7)
    stub.ModelInfer(_request(_valid(rng)), timeout=120)  # the valid request this fuzz mutates is served
    rss_before = server.resident_mb()
    outcomes: Counter[str] = Counter()
    names = sorted(MUTATIONS)
    for i in range(500):
        kind = names[i % len(names)]
        request = _request(MUTATIONS[kind](_valid(rng), rng))
        try:
            stub.ModelInfer(request, timeout=60)
            outcomes[f"{kind}: ACCEPTED"] += 1
        except grpc.RpcError as e:
            code = e.code()
            ok = code == grpc.StatusCode.INVALID_ARGUMENT and bool(e.details())
            outcomes[kind if ok else f"{kind}: {code.name} {e.details()[:120]}"] += 1
    bad = {k: v for k, v in outcomes.items() if ":" in k}
    assert not bad, f"not refused as INVALID_ARGUMENT with a message: {bad}"
    assert sum(outcomes.values()) == 500 and len(outcomes) == len(MUTATIONS)
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live
    assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready
    stub.ModelInfer(_request(_valid(rng)), timeout=120)  # and still serves
    growth = server.resident_mb() - rss_before
    print(f"500 refused ({dict(outcomes)}); resident memory growth {growth:.0f} MB")
    assert growth < 300, f"server memory grew by {growth:.0f} MB over 500 refused requests"
    channel.close()
