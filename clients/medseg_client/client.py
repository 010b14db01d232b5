"""A thin, typed gRPC client of the medseg ensemble (on ``tritonclient.grpc``).

    with SegmentationClient("localhost:8001") as client:
        client.wait_until_ready(timeout_s=60)
        result = client.segment(ct_zyx_int16, spacing_zyx_mm)

The study is checked against the spec before it is sent, the model's metadata against the spec
before the first request; transport errors come back as medseg's own exceptions. A client on the
server's host may ask for shared memory (``shared_memory=True`` or "system"; "cuda[:N]" on a GPU): the volume and the labels
then cross through a region registered for that one request instead of gRPC messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from medseg_client.card import CARD_PARAMETER, ModelCard, spec_card
from medseg_client.errors import MedsegError, ServerError, StudyError
from medseg_client.protocol import ADMIN_GRPC_HEADER, SERVER_TIMINGS_KEY, TENANT_KEY_HEADER, shared_memory_kind
from medseg_client.spec import SPEC, ModelIO
from medseg_client.validate import check_study


class ModelMismatchError(MedsegError):
    """The server's model does not have the inputs and outputs the spec says it has."""


CONTROL_TIMEOUT_S = 10.0  # deadline of every call that is not an inference (metadata, shared memory, statistics)


class CancelledError(MedsegError):
    """The caller cancelled the study (its ``cancel`` event was set): never retried, nothing returned."""


class ServerUnavailableError(ServerError):
    """The server could not be reached, did not answer in time or is still loading its models
    (gRPC UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND "no available versions"): the only errors worth retrying."""


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel options (messages up to 2 GiB, its keepalive defaults) plus a short
    reconnect backoff: gRPC's default grows to 2 minutes, so a client would keep failing long after a
    restarted server is back. (Passing channel_args replaces tritonclient's options, hence the copy.)"""
    from tritonclient.grpc import KeepAliveOptions

    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


STAT_STEPS = ("queue", "compute_input", "compute_infer", "compute_output")

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
RAW_INPUT_CONTENTS_FIELD = 7  # ModelInferRequest.raw_input_contents in Triton's grpc_service.proto


def _varint(value: int) -> bytes:
    """A protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def wire_request(request: Any, contents: list[np.ndarray]) -> bytes:
    """The wire bytes of a ModelInferRequest (without raw contents) followed by each array as one more
    ``raw_input_contents`` field: protobuf allows a repeated field's items anywhere in the message, so this parses
    as the same request. Each array is copied once, where the generated code's serializer takes a copy for the
    message, another for the bytes and a slow third (1.3 s for a 157 MB study on two cores)."""
    parts: list[Any] = [request.SerializeToString()]
    tag = _varint((RAW_INPUT_CONTENTS_FIELD << 3) | 2)  # wire type 2: length-delimited
    for array in contents:
        view = memoryview(np.ascontiguousarray(array)).cast("B")  # type: ignore[arg-type]
        parts += [tag, _varint(view.nbytes), view]
    return b"".join(parts)


def model_statistics(stats: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Triton's statistics (as JSON) per model: successful requests and cumulative ns of each step."""
    out: dict[str, dict[str, float]] = {}
    for m in stats.get("model_stats", []):
        s = m.get("inference_stats", {})
        out[m["name"]] = {"count": float(s.get("success", {}).get("count", 0)),
                          **{k: float(s.get(k, {}).get("ns", 0)) for k in STAT_STEPS}}
    return out


def study_key(ct: np.ndarray, spacing: tuple[float, float, float]) -> str:
    """A short digest of a study's voxels and spacing: the request id of every attempt at it."""
    voxels: Any = np.ascontiguousarray(ct)
    h = hashlib.sha256(memoryview(voxels).cast("B"))  # the voxels in place, not a copy
    h.update(np.asarray(spacing, np.float64).tobytes())
    return h.hexdigest()[:24]


@dataclass
class SegmentationResult:
    """Labels on the study's grid, the server's findings, and where the time went."""

    labels: np.ndarray
    findings: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)
    attempts: int = 1  # requests sent for this study (> 1 after a retried outage)


def _raise_from(e: Exception, what: str) -> None:
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        status = str(e.status() or "")
        message = e.message() or str(e)
        if "INVALID_ARGUMENT" in status:
            raise StudyError(f"{what}: the server refused the study: {message}") from e
        # a server starting or stopping answers NOT_FOUND "... has no available versions" for its models:
        # the model is there but not loaded, as transient as a refused connection
        loading = "NOT_FOUND" in status and ("no available versions" in message or "is not ready" in message)
        if "UNAVAILABLE" in status or "DEADLINE" in status or loading:
            raise ServerUnavailableError(f"{what}: server unavailable ({status}): {message}") from e
        raise ServerError(f"{what}: {status} {message}".strip()) from e
    raise e


def _shm_module(kind: str, device: int) -> Any:
    """tritonclient's shared-memory utilities of ``kind``; CUDA's need the cuda-python package and a GPU here."""
    if kind != "cuda":
        from tritonclient.utils import shared_memory

        return shared_memory
    try:
        from tritonclient.utils import cuda_shared_memory
    except (ImportError, RuntimeError, OSError) as e:
        raise ServerError(f"CUDA shared memory needs the cuda-python package (pip install 'tritonclient[cuda]') and "
                          f"an NVIDIA GPU on this host ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return cuda_shared_memory


class SegmentationClient:
    """gRPC client of the ensemble; a context manager that closes its channel."""

    def __init__(self, url: str, model_name: str = SPEC.ensemble.name, timeout_s: float = 300.0,
                 shared_memory: bool | str = False, tenant_key: str | None = None, tls_ca: Path | None = None,
                 admin_key: str | None = None, retries: int = 3, backoff_s: float = 0.5) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.shared_memory = shared_memory_kind(shared_memory)
        self.retries, self.backoff_s = retries, backoff_s  # for ServerUnavailableError only
        self._control_s = min(CONTROL_TIMEOUT_S, timeout_s)
        # behind a medseg gateway every call carries the tenant's key; the admin key opens shared-memory
        # registration and statistics on a hardened server (neither is ever logged)
        headers = {TENANT_KEY_HEADER: tenant_key, ADMIN_GRPC_HEADER: admin_key}
        self._headers = {k: v for k, v in headers.items() if v} or None
        if tls_ca is not None and not Path(tls_ca).is_file():
            raise ServerError(f"TLS CA file not found: {tls_ca}")
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url=url, ssl=tls_ca is not None,
                                                        root_certificates=str(tls_ca) if tls_ca else None,
                                                        channel_args=channel_args())
        self._checked = False
        self._tls_ca = tls_ca
        self._raw_channel: Any = None  # opened by the first request sent as raw bytes (_infer_raw)

    def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Poll until the server and the ensemble are ready; ServerError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                h = self._headers
                if self._client.is_server_ready(headers=h, client_timeout=2.0) and self._client.is_model_ready(
                        self.model_name, headers=h, client_timeout=2.0):
                    return
                last = "not ready"
            except Exception as e:
                last = type(e).__name__
            time.sleep(0.2)
        raise ServerError(f"{self.url}: model {self.model_name} not ready after {timeout_s:.0f} s ({last})")

    def check_model(self, expected: ModelIO = SPEC.ensemble) -> dict[str, Any]:
        """Compare the served model's inputs and outputs with the spec; return its metadata."""
        try:
            meta = self._client.get_model_metadata(self.model_name, headers=self._headers, as_json=True,
                                                   client_timeout=self._control_s)
        except Exception as e:
            _raise_from(e, f"{self.url}: model metadata")
        for kind, tensors in (("inputs", expected.inputs), ("outputs", expected.outputs)):
            served = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta.get(kind, [])}
            for t in tensors:
                want_dtype = "BYTES" if t.dtype == "STRING" else t.dtype
                got = served.get(t.name)
                want = (want_dtype, [-1, *t.dims])
                if got != want:
                    raise ModelMismatchError(f"{self.model_name} {kind[:-1]} {t.name}: expected {want}, server has {got}")
        self._checked = True
        return dict(meta)

    def model_ready(self, model: str | None = None) -> bool:
        """Whether the server has ``model`` (default: this client's) loaded and ready; ServerError if it does not
        answer."""
        try:
            return bool(self._client.is_model_ready(model or self.model_name, headers=self._headers,
                                                    client_timeout=self._control_s))
        except Exception as e:
            _raise_from(e, f"{self.url}: readiness of {model or self.model_name}")
            raise  # unreachable: _raise_from raises

    def _card_of(self, model: str) -> ModelCard | None:
        """The card in ``model``'s configuration, or None where it is no medseg ensemble."""
        try:
            reply = self._client.get_model_config(model, headers=self._headers, as_json=True,
                                                  client_timeout=self._control_s)
        except Exception as e:
            _raise_from(e, f"{self.url}: configuration of {model}")
        config = reply.get("config", {})
        text = config.get("parameters", {}).get(CARD_PARAMETER, {}).get("string_value", "")
        if config.get("platform") != "ensemble" or not text:
            return None
        return ModelCard.from_json(text, f"{model}'s card")

    def card(self) -> ModelCard:
        """The served model's card (labels, codes, versions, how it runs), from its ensemble's configuration."""
        if self.model_name == SPEC.ensemble.name:
            return spec_card()
        card = self._card_of(self.model_name)
        if card is None:
            raise ModelMismatchError(f"{self.url}: {self.model_name} has no medseg model card (not a medseg ensemble)")
        return card

    def models(self) -> list[ModelCard]:
        """The cards of every medseg model the server has loaded (needs the model-repository protocol: the admin
        key on a hardened server)."""
        try:
            index = self._client.get_model_repository_index(headers=self._headers, as_json=True,
                                                            client_timeout=self._control_s)
        except Exception as e:
            from tritonclient.utils import InferenceServerException

            if isinstance(e, InferenceServerException) and "restricted" in str(e.message() or e):
                raise ServerError(f"{self.url}: the model list is an admin API on this server; set MEDSEG_ADMIN_KEY "
                                  "(or name the model: medseg segment --model-name NAME)") from None
            _raise_from(e, f"{self.url}: model repository index")
        cards = [self._card_of(entry["name"]) for entry in index.get("models", []) if entry.get("state") == "READY"]
        return sorted((c for c in cards if c is not None), key=lambda c: c.name)

    def segment(self, ct: np.ndarray, spacing: tuple[float, float, float],
                cancel: threading.Event | None = None) -> SegmentationResult:
        """Segment one (z, y, x) int16 HU volume with its (z, y, x) spacing in mm.

        A server that is unreachable, too slow or still loading is retried up to ``retries`` times with full-jitter
        exponential backoff, every attempt carrying the study's key as its request id; a refused study
        (INVALID_ARGUMENT) or a server-side failure is never retried. Setting ``cancel`` (from any thread)
        cancels the request in flight and raises CancelledError. One call, one result or one error.
        """
        check_study(ct.shape, ct.dtype, spacing)
        key = study_key(ct, spacing)
        cancel = cancel or threading.Event()
        for attempt in range(self.retries + 1):
            try:
                result = self._segment_once(ct, spacing, key, cancel)
                result.attempts = attempt + 1
                return result
            except ServerUnavailableError as e:
                if attempt == self.retries:
                    raise ServerUnavailableError(f"{e} (gave up after {attempt + 1} attempts)") from e
                if cancel.wait(random.uniform(0.0, self.backoff_s * 2**attempt)):
                    raise CancelledError(f"{self.url}: segmenting cancelled by the caller (waiting to retry)") from e
                self._checked = False  # a server that came back may serve another model: check it again
        raise AssertionError("unreachable")

    def _infer(self, inputs: list[Any], outputs: list[Any], key: str, cancel: threading.Event) -> Any:
        """One inference request that ``cancel`` (or Ctrl-C) cancels on the wire; its response."""
        if cancel.is_set():
            raise CancelledError(f"{self.url}: segmenting cancelled by the caller")
        done = threading.Event()
        box: dict[str, Any] = {}

        def callback(result: Any, error: Any) -> None:
            box["result"], box["error"] = result, error
            done.set()

        call = self._client.async_infer(self.model_name, inputs, callback, outputs=outputs, request_id=key,
                                        client_timeout=self.timeout_s, headers=self._headers)
        self._await(call, done, cancel)
        if box["error"] is not None:
            raise box["error"]
        return box["result"]

    def _await(self, call: Any, done: threading.Event, cancel: threading.Event) -> None:
        """Wait for a call in flight until ``done``; setting ``cancel`` (or Ctrl-C) cancels it on the wire, so the
        server is told too."""
        try:
            while not done.wait(0.05):
                if cancel.is_set():
                    raise CancelledError(f"{self.url}: segmenting cancelled by the caller")
        except BaseException:
            call.cancel()
            raise

    def _infer_raw(self, inputs: list[tuple[str, str, np.ndarray]], outputs: list[str], key: str,
                   cancel: threading.Event) -> Any:
        """One ModelInfer call with the tensors written into the request's bytes once (``wire_request``), on a channel
        of its own with the client's options, deadline and headers; cancelled on the wire like ``_infer``. The response
        as tritonclient's InferResult, an error as its InferenceServerException."""
        import grpc
        from tritonclient.grpc import InferResult, service_pb2
        from tritonclient.utils import InferenceServerException

        if cancel.is_set():
            raise CancelledError(f"{self.url}: segmenting cancelled by the caller")
        request = service_pb2.ModelInferRequest(model_name=self.model_name, id=key)
        for name, datatype, array in inputs:
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, datatype
            tensor.shape.extend(array.shape)
        for name in outputs:
            request.outputs.add().name = name
        body = wire_request(request, [array for _, _, array in inputs])
        if self._raw_channel is None:
            if self._tls_ca is None:
                self._raw_channel = grpc.insecure_channel(self.url, options=channel_args())
            else:
                creds = grpc.ssl_channel_credentials(root_certificates=Path(self._tls_ca).read_bytes())
                self._raw_channel = grpc.secure_channel(self.url, creds, options=channel_args())
        infer = self._raw_channel.unary_unary(INFER_METHOD, request_serializer=None,
                                              response_deserializer=service_pb2.ModelInferResponse.FromString)
        done = threading.Event()
        call = infer.future(body, timeout=self.timeout_s, metadata=tuple((self._headers or {}).items()))
        del body
        call.add_done_callback(lambda _: done.set())
        self._await(call, done, cancel)
        try:
            return InferResult(call.result())
        except grpc.RpcError as e:  # as tritonclient reports it, so _raise_from sorts it the same way
            raise InferenceServerException(msg=e.details(), status=str(e.code()),
                                           debug_details=e.debug_error_string()) from None

    def _segment_once(self, ct: np.ndarray, spacing: tuple[float, float, float], key: str,
                      cancel: threading.Event) -> SegmentationResult:
        if not self._checked:
            self.check_model()
        ct_in, sp_in = SPEC.ensemble.inputs
        labels_t, findings_t = SPEC.ensemble.outputs
        volume = np.ascontiguousarray(ct, dtype=np.int16)[None]
        spacing_t = np.asarray(spacing, np.float32).reshape(1, 3)
        with ExitStack() as stack:
            before = self._model_stats()
            t0 = time.perf_counter()
            try:
                if self.shared_memory:
                    response, read_labels = self._infer_shm(stack, volume, spacing_t, key, cancel)
                else:  # in the message, written into the request's bytes once
                    response = self._infer_raw([(ct_in.name, ct_in.dtype, volume), (sp_in.name, sp_in.dtype, spacing_t)],
                                               [t.name for t in SPEC.ensemble.outputs], key, cancel)
                    read_labels = lambda response: response.as_numpy(labels_t.name)[0]  # noqa: E731
            except Exception as e:
                _raise_from(e, f"{self.url}: segmenting")
            elapsed = time.perf_counter() - t0
            try:
                labels = read_labels(response)
                findings = json.loads(response.as_numpy(findings_t.name).reshape(-1)[0])
                server_timings = findings.pop(SERVER_TIMINGS_KEY, {})
            except (ValueError, TypeError, IndexError) as e:  # e.g. an output that came back empty
                raise ServerError(f"{self.url}: the server's response is incomplete or malformed ({e}); "
                                  "nothing was kept") from e
        if labels.shape != ct.shape:
            raise ServerError(f"server returned labels of shape {labels.shape} for a study of shape {ct.shape}")
        stages = self._stage_times(before, self._model_stats(), self.model_name)
        timings = {"request_s": round(elapsed, 3), **stages, **server_timings}
        return SegmentationResult(labels, findings, timings)

    def _infer_shm(self, stack: ExitStack, volume: np.ndarray, spacing: np.ndarray, key: str,
                   cancel: threading.Event) -> tuple[Any, Callable[[Any], np.ndarray]]:
        """The request with the study and the labels in shared memory (system, or CUDA on a GPU of this host)
        registered for this one request (released by ``stack``); its response and the function that reads the
        labels back."""
        g = self._grpc
        ct_in, sp_in = SPEC.ensemble.inputs
        inputs = [g.InferInput(ct_in.name, list(volume.shape), ct_in.dtype), g.InferInput(sp_in.name, [1, 3], sp_in.dtype)]
        inputs[1].set_data_from_numpy(spacing)
        outputs = [g.InferRequestedOutput(t.name) for t in SPEC.ensemble.outputs]
        shm, regions = stack.enter_context(self._shm_regions(volume.nbytes, volume.size))
        shm.set_shared_memory_region(regions["in"][0], [volume])
        inputs[0].set_shared_memory(regions["in"][1], volume.nbytes)
        outputs[0].set_shared_memory(regions["out"][1], volume.size)
        response = self._infer(inputs, outputs, key, cancel)
        return response, lambda _: np.array(shm.get_contents_as_numpy(regions["out"][0], np.uint8, list(volume.shape))[0])

    @contextmanager
    def _shm_regions(self, in_bytes: int, out_bytes: int) -> Iterator[tuple[Any, dict[str, tuple[Any, str]]]]:
        """Input and output shared-memory regions of this client's kind registered with the server for one
        request: (tritonclient's module for that kind, role -> (handle, name))."""
        kind, _, device_text = str(self.shared_memory).partition(":")
        device = int(device_text or 0)
        shm = _shm_module(kind, device)
        c, opts = self._client, {"headers": self._headers, "client_timeout": self._control_s}
        if kind == "cuda":
            def create(name: str, size: int) -> Any:
                return shm.create_shared_memory_region(name, size, device)

            def register(name: str, handle: Any, size: int) -> None:
                c.register_cuda_shared_memory(name, shm.get_raw_handle(handle), device, size, **opts)
        else:
            def create(name: str, size: int) -> Any:
                return shm.create_shared_memory_region(name, f"/{name}", size)

            def register(name: str, handle: Any, size: int) -> None:
                c.register_system_shared_memory(name, f"/{name}", size, **opts)

        tag = f"medseg-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        made: dict[str, tuple[Any, str]] = {}
        try:
            for role, size in (("in", in_bytes), ("out", out_bytes)):
                name = f"{tag}-{role}"
                try:
                    made[role] = (create(name, size), name)
                except Exception as e:  # no device, out of device memory: tritonclient's own exception types
                    raise ServerError(f"{kind} shared memory: cannot make a {size}-byte region"
                                      f"{f' on cuda:{device}' if kind == 'cuda' else ''} ({e})") from None
                try:
                    register(name, made[role][0], size)
                except Exception as e:
                    _raise_from(e, f"{self.url}: registering {kind} shared memory (is the client on the server's host?)")
            yield shm, made
        finally:
            left = []
            for handle, name in made.values():
                try:
                    self._unregister(kind, name)
                except Exception:  # gone, or the region is still in use by a cancelled request
                    left.append(name)
                shm.destroy_shared_memory_region(handle)  # the server's own mapping outlives the name
            if left:
                threading.Thread(target=self._unregister_later, args=(kind, left), daemon=True).start()

    def _unregister(self, kind: str, name: str) -> None:
        unregister = self._client.unregister_cuda_shared_memory if kind == "cuda" else \
            self._client.unregister_system_shared_memory
        unregister(name, headers=self._headers, client_timeout=self._control_s)

    def _unregister_later(self, kind: str, names: list[str], every_s: float = 0.5) -> None:
        """Unregister regions the server still uses (a cancelled request runs on): Triton refuses to
        unregister a region in use, so try again until it lets go, the server is gone, or the deadline."""
        status = self._client.get_cuda_shared_memory_status if kind == "cuda" else \
            self._client.get_system_shared_memory_status
        deadline = time.monotonic() + self.timeout_s
        while names and time.monotonic() < deadline:
            time.sleep(every_s)
            try:
                registered = status(headers=self._headers, as_json=True, client_timeout=self._control_s)
            except Exception:  # the server is gone: its registrations went with it
                return
            names = [n for n in names if n in registered.get("regions", {})]
            for name in names:
                try:
                    self._unregister(kind, name)
                except Exception:
                    pass

    def _model_stats(self) -> dict[str, tuple[float, float]]:
        """(successful requests, cumulative queue + compute ns) of each model; {} where statistics are closed to us."""
        try:
            stats = self._client.get_inference_statistics(headers=self._headers, as_json=True,
                                                           client_timeout=self._control_s)
        except Exception:
            return {}
        return {name: (s["count"], sum(s[k] for k in STAT_STEPS)) for name, s in model_statistics(stats).items()}

    @staticmethod
    def _stage_times(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
                     model_name: str = SPEC.ensemble.name) -> dict[str, float]:
        """This request's preprocess and segmenter seconds from Triton's server-wide statistics: only for a model that
        served exactly one request between the two readings (this one); with other clients in flight the figures
        would be theirs too, and are left out. (The postprocess measures its own time; the server sends it.)"""
        names = {SPEC.preprocess.name: "preprocess_s", SPEC.segmenter.name: "segmenter_s"}
        if model_name != SPEC.ensemble.name:  # an imported model's steps (medseg_client.card)
            names = {f"{model_name}_preprocess": "preprocess_s", f"{model_name}_segmenter": "segmenter_s"}
        out = {}
        for model, label in names.items():
            if model in before and model in after and after[model][0] - before[model][0] == 1:
                out[label] = round((after[model][1] - before[model][1]) / 1e9, 3)
        return out

    def close(self) -> None:
        self._client.close()
        if self._raw_channel is not None:
            self._raw_channel.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
