"""``DiarizationClient`` and ``Stream``: live audio in, speaker activity and segments out.

A stream is one Triton sequence on the preset's ensemble ``diarizer_<preset>``. ``Stream.feed`` takes
audio in any pieces, at any sample rate and channel layout; it resamples to 16 kHz mono (soxr, streaming)
and cuts the audio into exactly the requests of ``sortformer_triton.protocol`` (so how the audio is split
into ``feed`` calls never changes what the server sees). ``Stream.close`` sends the partial last step,
the flush steps and END, and returns the ``Result``: every confirmed frame and every finalized segment.

Used as a context manager, a stream always ends its sequence: normally with ``close``; after an error
with one END request (best effort) so the server frees the sequence slot at once.

Example::

    from clients.sortformer_client import DiarizationClient

    with DiarizationClient("localhost:8001", protocol="grpc-stream", preset="low") as client:
        with client.open_stream() as stream:
            for pcm in microphone_chunks():          # any length, e.g. 44.1 kHz stereo int16
                for update in stream.feed(pcm, 44100):
                    show(update.confirmed, update.tentative_segments)
            result = stream.close()
        print(result.segments)
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import secrets
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from sortformer_triton import contract, offline, server_flags
from sortformer_triton.contract import SAVE_PROFILE_PARAMETER
from sortformer_triton.presets import N_SPEAKERS, PRESETS, SAMPLE_RATE, Preset, get_preset, requests_for
from sortformer_triton.protocol import PredictionAssembler, StepRequest
from sortformer_triton.profiles import ProfileError, SpeakerProfile, saved_in
from sortformer_triton.segments_codec import unpack_segments
from sortformer_triton.speakers import (ENROLL_OVERWRITE_PARAMETER, ENROLL_PARAMETER, SPEAKER_NAMES_PARAMETER,
                                        check_name, check_names)
from sortformer_triton.timeline import Segment, parse_segment_params

from .audio import PathLike, Resampler, check_sample_rate, load_audio, resample_to_16k, to_mono_float32
from . import offline as offline_client
from .chunker import StepChunker
from .errors import DiarizationError, ModelUnavailable, RequestTimeout, ServerUnavailable, StreamError
from .results import Result, Update
from .retry import RetryPolicy
from .transport import (
    PROTOCOLS,
    RawResponse,
    Transport,
    check_parameters,
    check_protocol,
    convert_error,
    normalize_url,
    open_transport,
)

DEFAULT_TIMEOUT_S = 60.0
SEQUENCE_ID_BITS = 63

UpdateCallback = Callable[["Update"], None]
EnrollmentClip = Tuple[str, np.ndarray, int]  # (name, samples, sample_rate)
ProgressCallback = Callable[[int, int], None]  # (requests answered, requests in all)


def new_sequence_id() -> int:
    """A random non-zero 63-bit sequence id (Triton's CORRID is uint64; 63 bits stay positive in int64)."""
    while True:
        value = secrets.randbits(SEQUENCE_ID_BITS)
        if value:
            return value


class Stream:
    """One live audio stream = one Triton sequence. Not thread-safe: use it from one thread.

    Made by :meth:`DiarizationClient.open_stream`. Nothing is sent before the first full step of audio.
    """

    def __init__(self, client: "DiarizationClient", transport: Transport, sequence_id: int,
                 parameters: Dict[str, Any], on_update: Optional[UpdateCallback],
                 names: Optional[Sequence[str]] = None, profile: Optional[SpeakerProfile] = None) -> None:
        self._client = client
        self._transport = transport
        self.sequence_id = sequence_id
        self.preset: Preset = client.preset
        self._parameters = parameters
        self._on_update = on_update
        self._chunker = StepChunker(self.preset)
        self._resampler: Optional[Resampler] = None
        self._assembler = PredictionAssembler()
        self._segments: List[Segment] = []
        self._names: Tuple[str, ...] = tuple(check_names(names)) if names is not None else ("",) * N_SPEAKERS
        self._start_profile = profile  # the START restores it (diarizer_<preset>_from_profile)
        self._save_next = False  # the next request asks for the state after it (save_profile)
        self.profile: Optional[SpeakerProfile] = None  # the last speaker profile the server saved
        self._enrolled_samples = 0  # the padded samples of the enrollment clips
        self._clips: List[str] = []
        self._responses = 0
        self._ended = False  # END was sent and answered
        self._closed = False  # the transport is released
        self._failed: Optional[BaseException] = None
        self._result: Optional[Result] = None
        self.retries = 0  # times the first request was retried (on a new sequence id each time)

    # ---- state --------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> Optional[int]:
        """The input sample rate of this stream (fixed by the first ``feed``)."""
        return self._resampler.sample_rate if self._resampler is not None else None

    @property
    def samples_sent(self) -> int:
        """16 kHz meeting samples taken so far (sent, or waiting for the rest of their step)."""
        return self._chunker.samples - self._enrolled_samples

    @property
    def speaker_names(self) -> Tuple[str, ...]:
        """The slots' names as the server last reported them ("" = unnamed)."""
        return self._names

    @property
    def requests_sent(self) -> int:
        return self._chunker.requests

    @property
    def frames_confirmed(self) -> int:
        return self._assembler.frames

    @property
    def confirmed(self) -> np.ndarray:
        """Every confirmed frame so far, ``[frames, 4]``."""
        return self._assembler.confirmed

    @property
    def finalized_segments(self) -> List[Segment]:
        """Every segment finalized so far, in reporting order."""
        return list(self._segments)

    @property
    def finished(self) -> bool:
        return self._assembler.finished

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- audio in -----------------------------------------------------------------------------
    def enroll(self, name: str, samples: np.ndarray, sample_rate: int = SAMPLE_RATE,
               overwrite: bool = False) -> List[Update]:
        """Play a named speaker's clip through the stream before the meeting (``sortformer_triton.speakers``).

        The clip (one voice, at least ~1 s of speech) is resampled on its own and zero-padded to whole
        steps; every step carries the parameter ``enroll=name``. Call it before the first ``feed``; its
        frames never appear in the outputs (the meeting starts at frame 0). The server names the slot that
        took the clip once all its frames are confirmed (with the next clip or the meeting's first
        responses); a clip no slot clearly took refuses the stream (``StreamError``).
        """
        self._check_open()
        check_name(name, "enrollment name")
        if self._resampler is not None or self._chunker.samples > self._enrolled_samples:
            raise ValueError("enrollment clips must come before the meeting audio (the first feed)")
        clip = resample_to_16k(to_mono_float32(samples), check_sample_rate(sample_rate))
        params: Dict[str, Any] = {ENROLL_PARAMETER: name}
        if overwrite:
            params[ENROLL_OVERWRITE_PARAMETER] = True
        steps = self._chunker.push_clip(clip, params)
        self._enrolled_samples += len(steps) * self.preset.step_samples
        self._clips.append(name)
        return self._send(steps)

    def request_profile(self) -> None:
        """Ask for the speaker state after the next request sent (``feed`` / ``close``): it arrives as
        ``self.profile`` (a ``SpeakerProfile`` with the slots' names), e.g. to ``.save()`` and start a later
        stream from it (``DiarizationClient.open_stream(profile=...)``)."""
        self._check_open()
        self._save_next = True

    def feed(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> List[Update]:
        """Send the complete steps of audio that ``samples`` completes; their updates, in order.

        ``samples``: ``[frames]`` or ``[frames, channels]``, float in [-1, 1] or integer PCM; any length
        (also 0). ``sample_rate`` must stay the same for the whole stream. Blocks until the responses of
        the requests sent here arrived.
        """
        self._check_open()
        rate = check_sample_rate(sample_rate)
        if self._resampler is None:
            self._resampler = Resampler(rate)
        elif rate != self._resampler.sample_rate:
            raise ValueError(
                f"this stream's audio is at {self._resampler.sample_rate} Hz; got {rate} Hz (one rate per stream)")
        audio = self._resampler.process(samples)
        return self._send(self._chunker.push(audio))

    def close(self, save_profile: bool = False) -> Result:
        """End the stream: the rest of the audio, the flush steps and END; the complete ``Result``.
        ``save_profile``: the END request asks for the final speaker state (``Result.profile``).

        Idempotent once it succeeded (returns the same result again).
        """
        if self._ended and self._result is not None:
            return self._result
        self._check_open()
        if save_profile:
            self._save_next = True
        tail = self._resampler.flush() if self._resampler is not None else np.zeros(0, np.float32)
        steps = self._chunker.push(tail) + self._chunker.finish()
        updates = self._send(steps)
        self._ended = True
        self._release()
        result = Result(
            sequence_id=self.sequence_id,
            preset=self.preset.name,
            n_samples=self.samples_sent,
            probs=self._assembler.confirmed,
            segments=tuple(self._segments),
            requests=self._responses,
            finished=self._assembler.finished,
            tail_updates=tuple(updates),
            speaker_names=self._names,
            profile=self.profile,
        )
        self._result = result
        return result

    def abort(self) -> None:
        """Give up the stream: one END request (best effort, errors ignored) and release the connection."""
        if self._closed:
            return
        try:
            reachable = not isinstance(self._failed, ServerUnavailable)  # else END cannot arrive either
            if self._chunker.requests > 0 and not self._ended and reachable:
                self._transport.abort(self._chunker.requests, self.sequence_id)
        finally:
            self._ended = True
            self._release()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self._failed is None:
            if not self._ended:
                self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"Stream(sequence_id={self.sequence_id}, preset={self.preset.name!r}, {state}, "
                f"requests={self.requests_sent}, frames={self.frames_confirmed})")

    # ---- internals ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._failed is not None:
            raise StreamError(f"stream {self.sequence_id} failed earlier: {self._failed}", self.sequence_id)
        if self._ended or self._closed:
            raise StreamError(f"stream {self.sequence_id} is closed", self.sequence_id)

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._transport.close()
            finally:
                self._client._forget(self.sequence_id)

    def _send(self, steps: Sequence[StepRequest]) -> List[Update]:
        if not steps:
            return []
        first_index = self._chunker.requests - len(steps)
        steps = list(steps)
        if first_index == 0 and self._start_profile is not None:
            steps[0] = dataclasses.replace(steps[0], profile=(self._start_profile.profile,
                                                              self._start_profile.restore_header()))
        if self._save_next:
            last = steps[-1]
            steps[-1] = dataclasses.replace(last, parameters={**(last.parameters or {}), SAVE_PROFILE_PARAMETER: True})
            self._save_next = False
        indexed = [(first_index + k, step) for k, step in enumerate(steps)]
        by_index = dict(indexed)
        updates: List[Update] = []
        try:
            raws: Iterable[RawResponse] = ()
            if first_index == 0:  # START: the one request that may be retried (see retry.py)
                raws = self._send_start(indexed[0])
                indexed = indexed[1:]
            for raw in itertools.chain(raws, self._transport.run(indexed, self.sequence_id, self._parameters)):
                update = self._decode(raw, by_index[raw.index])
                updates.append(update)
                if self._on_update is not None:
                    self._on_update(update)
        except BaseException as exc:
            self._failed = exc
            raise
        return updates

    def _send_start(self, first: Tuple[int, StepRequest]) -> List[RawResponse]:
        """The first request, retried per the client's ``RetryPolicy`` on a fresh sequence id each time."""
        policy = self._client.retry
        while True:
            try:
                return list(self._transport.run([first], self.sequence_id, self._parameters))
            except DiarizationError as exc:
                if not policy.should_retry(exc, attempt=self.retries + 1):
                    raise
                if isinstance(exc, RequestTimeout):  # the START may still arrive: end that sequence
                    self._transport.abort(1, self.sequence_id)
                self._transport.close()
                time.sleep(policy.delay(self.retries))
                old = self.sequence_id
                self.sequence_id = self._client._reserve_id(None)
                self._client._forget(old)
                self._transport = self._client._open_transport()
                self.retries += 1

    def _decode(self, raw: RawResponse, step: StepRequest) -> Update:
        out = raw.outputs

        def scalar(name: str) -> int:
            return int(np.asarray(out[name]).reshape(-1)[0])

        n_conf, n_tent = scalar(contract.N_CONFIRMED), scalar(contract.N_TENTATIVE)
        offset, finished = scalar(contract.FRAME_OFFSET), bool(scalar(contract.FINISHED))
        confirmed = np.asarray(out[contract.CONFIRMED], np.float32).reshape(-1, self.preset.chunk_len, 4)[0]
        tentative = np.asarray(out[contract.TENTATIVE], np.float32)
        tentative = tentative.reshape(-1, tentative.shape[-2], 4)[0]
        try:
            if not 0 <= n_conf <= confirmed.shape[0] or not 0 <= n_tent <= tentative.shape[0]:
                raise ValueError(f"counts N_CONFIRMED={n_conf} N_TENTATIVE={n_tent} exceed the rows")
            segments = unpack_segments(out[contract.SEGMENTS], scalar(contract.N_SEGMENTS))
            self._assembler.add(confirmed, n_conf, offset, tentative, n_tent, finished)
        except ValueError as exc:
            raise StreamError(f"response {raw.index} of sequence {self.sequence_id} breaks the stream "
                              f"protocol: {exc}", self.sequence_id, raw.index) from None
        names = out.get(contract.SPEAKER_NAMES)
        if names is not None:
            self._names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n)
                                for n in np.asarray(names, dtype=object).reshape(-1))
        header = out.get(contract.SAVED_PROFILE_HEADER)
        if header is not None and saved_in(header):
            try:
                self.profile = SpeakerProfile.from_outputs(self.preset, out[contract.SAVED_PROFILE], header,
                                                           self._names)
            except ProfileError as exc:
                raise StreamError(f"response {raw.index} of sequence {self.sequence_id} carries a speaker profile "
                                  f"that does not check: {exc}", self.sequence_id, raw.index) from None
        final = tuple(s for s in segments if s.finalized)
        self._segments.extend(final)
        self._responses += 1
        return Update(
            index=raw.index,
            frame_offset=offset,
            confirmed=confirmed[:n_conf].copy(),
            tentative=tentative[:n_tent].copy(),
            finalized_segments=final,
            tentative_segments=tuple(s for s in segments if not s.finalized),
            finished=finished,
            end=step.end,
            latency_s=raw.latency_s,
            speaker_names=self._names,
        )


class DiarizationClient:
    """Client of one Triton server and one preset's ensemble (``diarizer_<preset>``).

    ``url``: ``host:port`` (a ``grpc://``/``http://`` scheme is accepted; default ports gRPC 8001, HTTP
    8000). ``protocol``: ``grpc`` (unary calls), ``grpc-stream`` (bidirectional streaming, one gRPC stream
    per sequence) or ``http``. ``timeout``: seconds per request (and for connecting). ``max_in_flight``:
    requests of one stream on the wire at once in ``grpc-stream`` mode (1 = wait for each response).
    ``retry``: how a stream's first request (START) is retried when the server is unavailable or does
    not answer in time (default ``RetryPolicy()``: 3 tries, 0.5 s then 1 s apart; ``NO_RETRY`` for
    none); later requests are never retried (see ``retry.py``). ``http_inference_key``: the key HTTP
    inference needs on this project's servers (header ``triton-inference-key``; default: the
    environment variable ``SORTFORMER_TRITON_HTTP_INFERENCE_KEY``; gRPC needs none).

    Nothing is contacted on construction; :meth:`check` verifies server and model. Thread-safe: many
    threads may open and drive their own streams on one client.
    """

    def __init__(self, url: str, protocol: str = "grpc", preset: Union[str, Preset] = "low",
                 timeout: float = DEFAULT_TIMEOUT_S, max_in_flight: int = 1,
                 retry: Optional[RetryPolicy] = None, http_inference_key: Optional[str] = None) -> None:
        self.protocol = check_protocol(protocol)
        key = http_inference_key or server_flags.configured_http_inference_key()
        self._http_headers = server_flags.http_inference_headers(key) if key else {}
        self.url = normalize_url(url, self.protocol)
        self.preset: Preset = preset if isinstance(preset, Preset) else get_preset(preset)
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
        self.max_in_flight = max_in_flight
        self.retry = RetryPolicy() if retry is None else retry
        if not isinstance(self.retry, RetryPolicy):
            raise ValueError(f"retry must be a RetryPolicy, got {retry!r}")
        self.model_name = contract.ensemble_name(self.preset)
        self._lock = threading.Lock()
        self._open_ids: Set[int] = set()
        self._grpc: Any = None  # shared unary gRPC client (thread-safe), made on first use
        self._closed = False

    # ---- server ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``ServerUnavailable`` / ``ModelUnavailable`` unless the server and the preset's
        ensemble are ready."""
        self._check_model(self.model_name, lambda admin: (
            f"model {self.model_name} (preset {self.preset.name!r}) is not ready on {self.url}; "
            f"ready ensembles: {', '.join(self._served_models(admin)) or 'none'}"))

    def _check_model(self, model: str, not_ready: Callable[[Any], str]) -> None:
        """``ServerUnavailable`` unless the server is live, ``ModelUnavailable(not_ready(admin))`` unless ``model``
        is ready."""
        admin = self._admin_client()
        try:
            try:
                live = admin.is_server_live(**self._admin_kwargs())
            except Exception as exc:  # noqa: BLE001
                raise convert_error(exc, self.url, self.protocol, model) from exc
            if not live:
                raise ServerUnavailable(self.url, self.protocol, "the server is not live")
            try:
                ready = admin.is_model_ready(model, **self._admin_kwargs())
            except Exception as exc:  # noqa: BLE001
                raise convert_error(exc, self.url, self.protocol, model) from exc
            if not ready:
                raise ModelUnavailable(not_ready(admin))
        finally:
            if admin is not self._grpc:
                admin.close()

    def served_presets(self) -> List[str]:
        """Presets whose ensemble is ready on the server."""
        admin = self._admin_client()
        try:
            return [name[len("diarizer_"):] for name in self._served_models(admin)]
        except Exception as exc:  # noqa: BLE001
            raise convert_error(exc, self.url, self.protocol, self.model_name) from exc
        finally:
            if admin is not self._grpc:
                admin.close()

    def _admin_kwargs(self) -> Dict[str, Any]:
        """gRPC health calls take a deadline; HTTP ones use the connection's network timeout."""
        return {} if self.protocol == "http" else {"client_timeout": self.timeout}

    def _served_models(self, admin: Any) -> List[str]:
        """Ready ``diarizer_*`` ensembles: from the repository index, or, where the server restricts that
        admin API (this project's servers do), by asking each known preset's ensemble."""
        from tritonclient.utils import InferenceServerException

        try:
            index = admin.get_model_repository_index(**self._admin_kwargs())
        except InferenceServerException as exc:
            if "restricted" not in str(exc).lower():
                raise
            names = {contract.ensemble_name(p) for p in PRESETS.values()} | {self.model_name}
            return sorted(n for n in names if admin.is_model_ready(n, **self._admin_kwargs()))
        if not isinstance(index, list):  # gRPC returns a protobuf message
            index = [{"name": m.name, "state": m.state} for m in index.models]
        return sorted(m["name"] for m in index
                      if str(m.get("name", "")).startswith("diarizer_") and m.get("state") == "READY")

    def _admin_client(self) -> Any:
        if self.protocol == "http":
            import tritonclient.http as httpclient

            return httpclient.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                    network_timeout=self.timeout)
        return self._shared_grpc()

    def _shared_grpc(self) -> Any:
        with self._lock:
            if self._closed:
                raise DiarizationError("this DiarizationClient is closed")
            if self._grpc is None:
                import tritonclient.grpc as grpcclient

                self._grpc = grpcclient.InferenceServerClient(self.url)
            return self._grpc

    # ---- streams --------------------------------------------------------------------------------
    def open_stream(self, sequence_id: Optional[int] = None, segment_params: Optional[Dict[str, Any]] = None,
                    on_update: Optional[UpdateCallback] = None,
                    speaker_names: Optional[Sequence[str]] = None,
                    profile: Optional[SpeakerProfile] = None) -> Stream:
        """A new stream (Triton sequence). ``sequence_id`` defaults to a fresh random 63-bit id; give one
        only to replay a sequence (e.g. tests). ``segment_params`` (onset, offset, pad_onset,
        pad_offset, min_duration_on, min_duration_off, median_filter_frames) go to the postprocessor as
        request parameters of the START request. ``on_update`` is called with every ``Update``.
        ``speaker_names`` (N_SPEAKERS names, "" = unnamed) names the slots from the start; enrollment
        clips (``Stream.enroll``) name them from the audio. ``profile`` (a ``SpeakerProfile``, e.g.
        ``SpeakerProfile.load(path)``) starts the stream from a saved speaker state, with its names."""
        params = check_parameters(segment_params)
        if profile is not None:
            profile.check_for(self.preset)
            if speaker_names is None:
                speaker_names = profile.names
        parse_segment_params(segment_params or {})  # the server's bounds: refused here, before any request
        if speaker_names is not None:
            speaker_names = check_names(list(speaker_names))
            params[SPEAKER_NAMES_PARAMETER] = json.dumps(speaker_names)
        sequence_id = self._reserve_id(sequence_id)
        try:
            transport = self._open_transport()
        except BaseException:
            self._forget(sequence_id)
            raise
        return Stream(self, transport, sequence_id, params, on_update, speaker_names, profile)

    def _reserve_id(self, sequence_id: Optional[int]) -> int:
        """A sequence id not open on this client: ``sequence_id``, or a fresh random one."""
        with self._lock:
            if self._closed:
                raise DiarizationError("this DiarizationClient is closed")
            if sequence_id is None:
                sequence_id = new_sequence_id()
                while sequence_id in self._open_ids:
                    sequence_id = new_sequence_id()
            else:
                if isinstance(sequence_id, bool) or not isinstance(sequence_id, int) \
                        or not 0 < sequence_id < 2 ** SEQUENCE_ID_BITS:
                    # Triton's CORRID is uint64, but gRPC carries sequence_id as an int64 parameter
                    # ("Value out of range" above 2**63-1): accept what every protocol accepts
                    raise ValueError(f"sequence_id must be an integer in 1 .. 2**63-1 (gRPC sends it as int64), "
                                     f"got {sequence_id!r}")
                if sequence_id in self._open_ids:
                    raise ValueError(f"sequence {sequence_id} is still open on this client")
            self._open_ids.add(sequence_id)
            return sequence_id

    def _open_transport(self) -> Transport:
        shared = self._shared_grpc() if self.protocol == "grpc" else None
        return open_transport(self.protocol, self.url, self.model_name, self.preset, self.timeout,
                              shared_grpc=shared, max_in_flight=self.max_in_flight,
                              http_headers=self._http_headers)

    def _forget(self, sequence_id: int) -> None:
        with self._lock:
            self._open_ids.discard(sequence_id)

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._open_ids)

    # ---- whole recordings -----------------------------------------------------------------------
    def diarize(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE,
                progress: Optional[ProgressCallback] = None, segment_params: Optional[Dict[str, Any]] = None,
                sequence_id: Optional[int] = None, enroll: Sequence[EnrollmentClip] = (),
                speaker_names: Optional[Sequence[str]] = None, profile: Optional[SpeakerProfile] = None,
                save_profile: bool = False) -> Result:
        """Stream a whole recording through one sequence and return its ``Result``.

        ``progress(done, total)`` is called after every response (``total`` = requests of the stream).
        ``enroll``: (name, samples, sample_rate) clips played first (``Stream.enroll``); ``profile``: start
        from this saved speaker state; ``save_profile``: the final state comes back as ``Result.profile``.
        """
        audio16 = resample_to_16k(audio, sample_rate)  # checks the rate and the samples (to_mono_float32)
        clips = [(name, resample_to_16k(samples, rate)) for name, samples, rate in enroll]
        clip_steps = sum(-(-c.size // self.preset.step_samples) for _, c in clips)
        total = requests_for(self.preset, int(audio16.size) + clip_steps * self.preset.step_samples)
        answered = [0]

        def on_update(update: Update) -> None:
            answered[0] += 1
            if progress is not None:
                progress(answered[0], total)

        with self.open_stream(sequence_id=sequence_id, segment_params=segment_params,
                              on_update=on_update, speaker_names=speaker_names, profile=profile) as stream:
            for name, clip in clips:
                stream.enroll(name, clip, SAMPLE_RATE)
            stream.feed(audio16, SAMPLE_RATE)
            return stream.close(save_profile=save_profile)

    def diarize_file(self, source: Union[PathLike, np.ndarray], sample_rate: Optional[int] = None,
                     progress: Optional[ProgressCallback] = None,
                     segment_params: Optional[Dict[str, Any]] = None, enroll: Sequence[EnrollmentClip] = (),
                     speaker_names: Optional[Sequence[str]] = None, profile: Optional[SpeakerProfile] = None,
                     save_profile: bool = False) -> Result:
        """Diarize an audio file (any format libsndfile reads) or an array (``sample_rate`` defaults to
        16000 for arrays; for files it is read from the file)."""
        if isinstance(source, np.ndarray):
            audio, rate = source, sample_rate or SAMPLE_RATE
        else:
            audio, rate = load_audio(source)
        return self.diarize(audio, rate, progress, segment_params, enroll=enroll, speaker_names=speaker_names,
                            profile=profile, save_profile=save_profile)

    def diarize_offline(self, audios: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE,
                        segment_params: Optional[Dict[str, Any]] = None,
                        concurrency: int = offline_client.DEFAULT_CONCURRENCY) -> List[Result]:
        """Whole recordings through the server's offline Sortformer (``diarizer_offline``; export it with
        ``--offline-model``), one request each, ``concurrency`` at once (the server batches them): one
        ``Result`` per recording, in order. A recording longer than the server's limit (90 s by default) is
        refused with the server's message; stream it through a preset instead (:meth:`diarize`)."""
        return offline_client.diarize_offline(self, audios, sample_rate, segment_params, concurrency)

    def check_offline(self) -> None:
        """Raise ``ServerUnavailable`` / ``ModelUnavailable`` unless the server serves ``diarizer_offline``."""
        self._check_model(offline.ENSEMBLE, lambda admin: (
            f"the server at {self.url} has no offline model ({offline.ENSEMBLE} is not ready): export the repository "
            "with --offline-model, or use a streaming preset"))

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the shared connection (streams still open keep their own until they close)."""
        with self._lock:
            self._closed = True
            client, self._grpc = self._grpc, None
        if client is not None:
            client.close()

    def __enter__(self) -> "DiarizationClient":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DiarizationClient({self.url!r}, protocol={self.protocol!r}, preset={self.preset.name!r})"


__all__ = ["DiarizationClient", "Stream", "new_sequence_id", "PROTOCOLS", "DEFAULT_TIMEOUT_S"]
