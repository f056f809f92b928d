"""The wire: one stream's requests over unary gRPC, gRPC bidirectional streaming, or HTTP.

Each transport turns protocol steps into Triton requests of one sequence (``sequence_id``, START on the
first request, END on the last) and yields the raw output tensors in request order. Triton's own
exceptions become the library's (``ServerUnavailable``, ``ModelUnavailable``, ``StreamError``,
``RequestTimeout``) with Triton's message kept. Every request carries its sequence id in the header
``x-sequence-id`` (a gRPC stream: when it opens), so a proxy in front of several replicas can keep the
sequence on the replica that holds its state (``sortformer_triton.proxy``).
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import socket
import time
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sortformer_triton import contract
from sortformer_triton.presets import Preset
from sortformer_triton.proxy import sequence_headers
from sortformer_triton.protocol import StepRequest

from .errors import DiarizationError, ModelUnavailable, RequestTimeout, ServerUnavailable, StreamError

PROTOCOLS: Tuple[str, ...] = ("grpc", "grpc-stream", "http")
DEFAULT_PORTS = {"grpc": 8001, "grpc-stream": 8001, "http": 8000}

OUTPUT_NAMES: Tuple[str, ...] = (
    contract.CONFIRMED, contract.N_CONFIRMED, contract.TENTATIVE, contract.N_TENTATIVE,
    contract.FRAME_OFFSET, contract.FINISHED, contract.SEGMENTS, contract.N_SEGMENTS, contract.SPEAKER_NAMES,
    contract.SAVED_PROFILE, contract.SAVED_PROFILE_HEADER,
)

# request parameters Triton reserves for itself (tritonclient refuses them)
_RESERVED_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end", "priority", "binary_data_output"}


@dataclasses.dataclass(frozen=True)
class RawResponse:
    index: int
    outputs: Dict[str, np.ndarray]
    latency_s: float


Step = Tuple[int, StepRequest]  # (request index within the stream, the step)


def check_protocol(protocol: str) -> str:
    name = protocol.strip().lower().replace("_", "-")
    if name in ("grpc-streaming", "stream"):
        name = "grpc-stream"
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return name


def normalize_url(url: str, protocol: str) -> str:
    """``host:port`` as tritonclient wants it: a ``grpc://``/``http://`` scheme is dropped, the protocol's
    default port (gRPC 8001, HTTP 8000) is added when none is given."""
    protocol = check_protocol(protocol)
    text = url.strip().rstrip("/")
    lowered = text.lower()
    if lowered.startswith(("https://", "grpcs://")):
        raise ValueError(f"TLS URLs are not supported by this client: {url!r}")
    for scheme in ("grpc://", "http://"):
        if lowered.startswith(scheme):
            text = text[len(scheme):]
            break
    if not text or "/" in text:
        raise ValueError(f"URL must be host[:port], got {url!r}")
    host_part = text.rsplit("]", 1)[-1]  # [ipv6]:port
    if ":" not in host_part:
        text = f"{text}:{DEFAULT_PORTS[protocol]}"
    return text


def check_parameters(parameters: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Request parameters (e.g. segment parameters for the postprocessor) as Triton accepts them."""
    if not parameters:
        return {}
    out: Dict[str, Any] = {}
    for key, value in parameters.items():
        if key in _RESERVED_PARAMETERS:
            raise ValueError(f"request parameter {key!r} is reserved by Triton")
        # numpy scalars as the Python values they hold: numpy 2's repr of np.float64(0.6) is
        # 'np.float64(0.6)', which the server cannot parse as a number (numpy 1.x wrote '0.6')
        if isinstance(value, np.bool_):
            value = bool(value)
        elif isinstance(value, np.integer):
            value = int(value)
        elif isinstance(value, np.floating):
            value = float(value)
        if isinstance(value, (bool, int, str)):
            out[key] = value
        elif isinstance(value, float):
            out[key] = repr(float(value))  # Triton request parameters are bool, int or string
        else:
            raise ValueError(f"request parameter {key!r} must be a bool, int, float or str, got {value!r}")
    return out


def request_parameters(step: StepRequest, stream: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What one request carries: the stream's parameters on START, and the step's own (``enroll``)."""
    out = dict(stream) if step.start else {}
    out.update(step.parameters or {})
    return out or None


# ---- errors -------------------------------------------------------------------------------------
_UNAVAILABLE_HINTS = ("unavailable", "failed to connect", "connection refused", "connect failed",
                      "socket closed", "connection reset", "name resolution", "broken pipe",
                      # a gRPC stream cut under the client: its server died (behind a proxy: RST_STREAM)
                      "stream removed", "rst_stream")
_MODEL_HINTS = ("unknown model", "is not ready", "is not found", "failed to load")


def convert_error(exc: BaseException, url: str, protocol: str, model: str, sequence_id: int = 0,
                  index: int = -1) -> DiarizationError:
    """A tritonclient / socket exception as the library's exception."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, DiarizationError):
        return exc
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = str(exc.message() or exc)
    else:
        status, message = type(exc).__name__, str(exc) or type(exc).__name__
    lowered = f"{status} {message}".lower()
    where = f"request {index} of sequence {sequence_id}" if index >= 0 else "request"
    if "deadline" in lowered or isinstance(exc, (socket.timeout, TimeoutError)) or "timed out" in lowered \
            or type(exc).__name__ == "Timeout":
        return RequestTimeout(f"{where} to {model} at {url} ({protocol}) timed out: {message}",
                              sequence_id, index, status, message)
    if isinstance(exc, (ConnectionError, OSError)) or any(h in lowered for h in _UNAVAILABLE_HINTS):
        if "503" in message or "(proxy:" in message:  # a proxy (sortformer_triton.proxy) without a live replica
            message += (" [the replica that held this sequence is gone, and its state with it: open a new stream]"
                        if index > 0 else " [no replica took the stream's START: retry later]")
        return ServerUnavailable(url, protocol, message)
    if any(h in lowered for h in _MODEL_HINTS):
        return ModelUnavailable(f"model {model} is not available at {url} ({protocol}): {message}")
    return StreamError(f"{where} to {model} at {url} ({protocol}) failed: {message}",
                       sequence_id, index, status, message)


# ---- transports -----------------------------------------------------------------------------------
class Transport:
    """One stream's connection. ``run`` sends steps and yields their responses in order."""

    protocol = ""

    def __init__(self, url: str, model: str, preset: Preset, timeout: float) -> None:
        self.url = url
        self.model = model
        self.preset = preset
        self.timeout = timeout

    def run(self, steps: Sequence[Step], sequence_id: int, parameters: Dict[str, Any]) -> Iterator[RawResponse]:
        raise NotImplementedError

    def abort(self, index: int, sequence_id: int) -> None:
        """Best effort: send one END request (0 valid samples) so the server frees the sequence."""
        step = StepRequest(audio=np.zeros(self.preset.step_samples, np.float32), valid=0, start=False, end=True)
        try:
            for _ in self.run([(index, step)], sequence_id, {}):
                pass
        except DiarizationError:
            pass

    def close(self) -> None:
        """Release the connection (idempotent)."""

    def _error(self, exc: BaseException, sequence_id: int, index: int) -> DiarizationError:
        return convert_error(exc, self.url, self.protocol, self.model, sequence_id, index)


def _make_inputs(module: Any, step: StepRequest, binary: bool) -> List[Any]:
    values = [(contract.AUDIO, "FP32", step.audio.reshape(1, -1)),
              (contract.AUDIO_LENGTH, contract.AUDIO_LENGTH_TENSOR.client_dtype,
               np.array([[step.valid]], contract.AUDIO_LENGTH_TENSOR.dtype))]
    if step.profile is not None:  # the START of a stream from a saved speaker profile
        profile, header = step.profile
        values += [(contract.PROFILE, "FP32", np.asarray(profile, np.float32).reshape(1, -1)),
                   (contract.PROFILE_HEADER, "INT64", np.asarray(header, np.int64).reshape(1, -1))]
    inputs = []
    for name, dtype, array in values:
        tensor = module.InferInput(name, list(array.shape), dtype)
        if binary:
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def model_for(model: str, preset: Preset, step: StepRequest) -> str:
    """The ensemble a request goes to: a START from a profile to ``diarizer_<preset>_from_profile``."""
    return contract.resume_ensemble_name(preset) if step.profile is not None else model


def _outputs(result: Any) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    for name in OUTPUT_NAMES:
        value = result.as_numpy(name)
        if value is None:
            raise StreamError(f"the response has no output {name}")
        out[name] = value
    return out


class GrpcTransport(Transport):
    """Unary gRPC: one ``infer`` call per request, in order (the client's channel may be shared)."""

    protocol = "grpc"

    def __init__(self, url: str, model: str, preset: Preset, timeout: float, client: Any) -> None:
        super().__init__(url, model, preset, timeout)
        import tritonclient.grpc as grpcclient

        self._module = grpcclient
        self._client = client
        self._outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUT_NAMES]

    def run(self, steps: Sequence[Step], sequence_id: int, parameters: Dict[str, Any]) -> Iterator[RawResponse]:
        for index, step in steps:
            t0 = time.perf_counter()
            try:
                result = self._client.infer(
                    model_for(self.model, self.preset, step), _make_inputs(self._module, step, binary=False),
                    outputs=self._outputs,
                    request_id=str(index), sequence_id=sequence_id, sequence_start=step.start,
                    sequence_end=step.end, client_timeout=self.timeout, headers=sequence_headers(sequence_id),
                    parameters=request_parameters(step, parameters),
                )
                outputs = _outputs(result)
            except Exception as exc:  # noqa: BLE001 - converted, with Triton's message
                raise self._error(exc, sequence_id, index) from exc
            yield RawResponse(index, outputs, time.perf_counter() - t0)


class HttpTransport(Transport):
    """HTTP/REST: one client (connection) per stream, binary tensors, requests in order."""

    protocol = "http"

    def __init__(self, url: str, model: str, preset: Preset, timeout: float,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(url, model, preset, timeout)
        import tritonclient.http as httpclient

        self._headers = dict(headers or {})  # the HTTP inference key (server_flags)
        self._module = httpclient
        self._client = httpclient.InferenceServerClient(
            url, connection_timeout=timeout, network_timeout=timeout)
        self._outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in OUTPUT_NAMES]

    def run(self, steps: Sequence[Step], sequence_id: int, parameters: Dict[str, Any]) -> Iterator[RawResponse]:
        for index, step in steps:
            t0 = time.perf_counter()
            try:
                result = self._client.infer(
                    model_for(self.model, self.preset, step), _make_inputs(self._module, step, binary=True),
                    outputs=self._outputs,
                    request_id=str(index), sequence_id=sequence_id, sequence_start=step.start,
                    sequence_end=step.end, headers={**self._headers, **sequence_headers(sequence_id)},
                    parameters=request_parameters(step, parameters),
                )
                outputs = _outputs(result)
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, sequence_id, index) from exc
            yield RawResponse(index, outputs, time.perf_counter() - t0)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


class GrpcStreamTransport(Transport):
    """gRPC bidirectional streaming: one stream (and one tritonclient) per sequence.

    Up to ``max_in_flight`` requests are on the wire at once (1 = send the next request only after the
    previous response); responses are matched to requests by request id and yielded in order.
    """

    protocol = "grpc-stream"

    def __init__(self, url: str, model: str, preset: Preset, timeout: float, max_in_flight: int = 1) -> None:
        super().__init__(url, model, preset, timeout)
        import tritonclient.grpc as grpcclient

        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
        self._module = grpcclient
        self._client: Any = grpcclient.InferenceServerClient(url)
        self._outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUT_NAMES]
        self.max_in_flight = max_in_flight
        self._responses: "queue.Queue[Tuple[float, Any, Any]]" = queue.Queue()
        self._started = False
        self._broken = False
        self._in_flight: Deque[Tuple[str, float]] = collections.deque()

    def _callback(self, result: Any, error: Any) -> None:
        self._responses.put((time.perf_counter(), result, error))

    def _start(self, sequence_id: int) -> None:
        if self._started:
            return
        try:
            # one gRPC stream carries one sequence: its opening headers place it (sortformer_triton.proxy)
            self._client.start_stream(callback=self._callback, headers=sequence_headers(sequence_id))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, sequence_id, 0) from exc
        self._started = True

    def _send(self, request_id: str, step: StepRequest, sequence_id: int, parameters: Dict[str, Any]) -> None:
        try:
            self._client.async_stream_infer(
                model_for(self.model, self.preset, step), _make_inputs(self._module, step, binary=False),
                outputs=self._outputs,
                request_id=request_id, sequence_id=sequence_id, sequence_start=step.start,
                sequence_end=step.end, parameters=request_parameters(step, parameters),
            )
        except Exception as exc:  # noqa: BLE001
            self._broken = True
            index = int(request_id) if request_id.isdigit() else -1
            # a dead stream reports why through the callback ("the error detail is reported through
            # provided callback"): prefer that error (e.g. UNAVAILABLE) to the generic one
            try:
                _, _, reported = self._responses.get(timeout=min(1.0, self.timeout))
            except queue.Empty:
                reported = None
            raise self._error(reported if reported is not None else exc, sequence_id, index) from exc
        self._in_flight.append((request_id, time.perf_counter()))

    def _receive(self, sequence_id: int) -> Tuple[str, Any, float]:
        request_id, sent = self._in_flight[0]
        index = int(request_id) if request_id.isdigit() else -1
        try:
            arrived, result, error = self._responses.get(timeout=self.timeout)
        except queue.Empty:
            self._broken = True
            raise RequestTimeout(
                f"request {index} of sequence {sequence_id} to {self.model} at {self.url} (grpc-stream) got "
                f"no response within {self.timeout:g} s", sequence_id, index) from None
        self._in_flight.popleft()
        if error is not None:
            raise self._error(error, sequence_id, index)
        got = result.get_response().id
        if got != request_id:
            self._broken = True
            raise StreamError(
                f"responses of sequence {sequence_id} arrived out of order: expected request {request_id}, "
                f"got {got}", sequence_id, index)
        return request_id, result, arrived - sent

    def run(self, steps: Sequence[Step], sequence_id: int, parameters: Dict[str, Any]) -> Iterator[RawResponse]:
        if self._broken:
            raise StreamError(f"the gRPC stream of sequence {sequence_id} is broken", sequence_id)
        self._start(sequence_id)
        pending = list(steps)
        position = 0
        while position < len(pending) or self._in_flight:
            while position < len(pending) and len(self._in_flight) < self.max_in_flight:
                index, step = pending[position]
                self._send(str(index), step, sequence_id, parameters)
                position += 1
            request_id, result, latency = self._receive(sequence_id)
            try:
                outputs = _outputs(result)
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, sequence_id, int(request_id)) from exc
            yield RawResponse(int(request_id), outputs, latency)

    def abort(self, index: int, sequence_id: int) -> None:
        if not self._started:
            return
        # collect what is still on the wire (bounded by the timeout), then send END
        deadline = time.monotonic() + self.timeout
        while self._in_flight and time.monotonic() < deadline:
            try:
                self._responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self._in_flight.popleft()
        if self._in_flight:
            return  # the stream is stuck: closing it cancels the requests
        self._broken = False
        super().abort(index, sequence_id)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._started:
                client.stop_stream(cancel_requests=bool(self._in_flight) or self._broken)
        finally:
            client.close()


def open_transport(protocol: str, url: str, model: str, preset: Preset, timeout: float,
                   shared_grpc: Any = None, max_in_flight: int = 1,
                   http_headers: Optional[Dict[str, str]] = None) -> Transport:
    protocol = check_protocol(protocol)
    if protocol == "grpc":
        return GrpcTransport(url, model, preset, timeout, shared_grpc)
    if protocol == "http":
        return HttpTransport(url, model, preset, timeout, http_headers)
    return GrpcStreamTransport(url, model, preset, timeout, max_in_flight)

