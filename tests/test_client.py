"""The client library: re-chunking, resampling, errors, writers, eval and split (mostly without a server),
plus the library against the real tiny server where that is what is being tested."""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.diarize.evaluate import evaluate
from clients.diarize.split import (
    SplitParams,
    clean_cut,
    exclude_overlaps,
    merge_adjacent,
    plan_split,
    separate,
    split_file,
)
from clients.sortformer_client import (
    DiarizationClient,
    NO_RETRY,
    ModelUnavailable,
    RequestTimeout,
    Resampler,
    Result,
    RetryPolicy,
    Segment,
    ServerUnavailable,
    StepChunker,
    Stream,
    StreamError,
    Turn,
    Update,
    new_sequence_id,
    normalize_url,
    parse_rttm,
    read_rttm,
    resample_to_16k,
    resampled_length,
    rttm_lines,
    to_mono_float32,
    write_json,
    write_rttm,
)
from clients.sortformer_client.transport import RawResponse, Transport, check_parameters
from sortformer_triton import contract
from sortformer_triton.local_server import free_port
from sortformer_triton.presets import PRESETS, Preset, requests_for
from sortformer_triton.protocol import PredictionAssembler, StepRequest, iter_steps
from sortformer_triton.samples import conversation

PROTOCOLS = ("grpc", "grpc-stream", "http")


# ---- a transport that records requests instead of sending them ------------------------------------
def fake_outputs(preset: Preset, end: bool) -> Dict[str, np.ndarray]:
    return {
        contract.CONFIRMED: np.zeros((1, preset.chunk_len, 4), np.float32),
        contract.N_CONFIRMED: np.zeros((1, 1), np.int32),
        contract.TENTATIVE: np.zeros((1, max(preset.right_context, 1), 4), np.float32),
        contract.N_TENTATIVE: np.zeros((1, 1), np.int32),
        contract.FRAME_OFFSET: np.zeros((1, 1), np.int64),
        contract.FINISHED: np.array([[int(end)]], np.int32),
        contract.SEGMENTS: np.zeros((1, contract.segment_rows(preset.chunk_len), 4), np.float32),
        contract.N_SEGMENTS: np.zeros((1, 1), np.int32),
    }


class RecordingTransport(Transport):
    protocol = "recording"

    def __init__(self, preset: Preset) -> None:
        super().__init__("recording:0", contract.ensemble_name(preset), preset, 1.0)
        self.sent: List[StepRequest] = []
        self.indices: List[int] = []
        self.parameters: List[Dict[str, Any]] = []

    def run(self, steps, sequence_id: int, parameters: Dict[str, Any]) -> Iterator[RawResponse]:
        for index, step in steps:
            self.sent.append(step)
            self.indices.append(index)
            self.parameters.append(dict(parameters))
            yield RawResponse(index, fake_outputs(self.preset, step.end), 0.0)


def recording_stream(preset: Preset, segment_params: Optional[Dict[str, Any]] = None) -> tuple:
    client = DiarizationClient("127.0.0.1:1", preset=preset)
    transport = RecordingTransport(preset)
    return Stream(client, transport, new_sequence_id(), check_parameters(segment_params), None), transport


def assert_same_requests(got: Sequence[StepRequest], want: Sequence[StepRequest]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert (g.valid, g.start, g.end) == (w.valid, w.start, w.end), f"request {k}"
        assert g.audio.dtype == np.float32 and g.audio.shape == w.audio.shape
        assert np.array_equal(g.audio, w.audio), f"request {k}: audio differs"


def cut(audio: np.ndarray, points: Sequence[int]) -> List[np.ndarray]:
    bounds = sorted({0, audio.shape[0], *(p % (audio.shape[0] + 1) for p in points)})
    return [audio[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@st.composite
def audio_and_splits(draw, rates=(16000,)) -> tuple:
    preset = PRESETS[draw(st.sampled_from(sorted(PRESETS)))]
    rate = draw(st.sampled_from(rates))
    edge = draw(st.sampled_from([0, -1, 1, None]))
    steps = draw(st.integers(0, 3))
    n16 = steps * preset.step_samples + (edge if edge is not None else draw(st.integers(0, preset.step_samples)))
    n = max(0, int(round(max(n16, 0) * rate / 16000)))
    points = draw(st.lists(st.integers(0, max(n, 1)), max_size=12))
    seed = draw(st.integers(0, 2 ** 16))
    return preset, rate, n, points, seed


# ---- re-chunking -----------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(audio_and_splits())
def test_chunker_any_split_equals_iter_steps(case) -> None:
    preset, _, n, points, seed = case
    audio = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    chunker = StepChunker(preset)
    got: List[StepRequest] = []
    for piece in cut(audio, points):
        got += chunker.push(piece)
    got += chunker.finish()
    want = list(iter_steps(preset, audio))
    assert len(want) == requests_for(preset, n)
    assert_same_requests(got, want)
    assert chunker.samples == n and chunker.requests == len(want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(audio_and_splits(rates=(16000, 8000, 22050, 44100, 48000)))
def test_stream_feed_any_split_gives_identical_requests(case) -> None:
    """Any split of the same audio into feed() calls, at any rate, gives the same requests: those of
    iter_steps over the whole recording resampled at once."""
    preset, rate, n, points, seed = case
    audio = (0.3 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)
    stream, transport = recording_stream(preset)
    fed_updates = []
    for piece in cut(audio, points):
        fed_updates += stream.feed(piece, rate)
    result = stream.close()
    audio16 = resample_to_16k(audio, rate)
    assert audio16.size == resampled_length(n, rate)
    assert_same_requests(transport.sent, list(iter_steps(preset, audio16)))
    assert transport.indices == list(range(len(transport.sent)))
    assert result.n_samples == audio16.size and result.requests == len(transport.sent)
    assert len(fed_updates) + len(result.tail_updates) == len(transport.sent)
    assert result.tail_updates[-1].end and stream.closed


def test_prediction_assembler_copies_and_checks_offsets() -> None:
    """The assembler keeps copies (not views of response buffers) and refuses a gap in the frames."""
    asm = PredictionAssembler()
    response = np.arange(24, dtype=np.float32).reshape(6, 4)
    asm.add(response, 2, 0, response[2:], 3)
    response[:] = -1.0  # the transport reuses or frees its buffer
    np.testing.assert_array_equal(asm.confirmed, np.arange(8, dtype=np.float32).reshape(2, 4))
    np.testing.assert_array_equal(asm.tentative, np.arange(8, 20, dtype=np.float32).reshape(3, 4))
    assert asm.frames == 2 and not asm.finished
    with pytest.raises(ValueError, match="offset 3, expected 2"):
        asm.add(response, 1, 3, response, 0)
    asm.add(np.ones((6, 4), np.float32), 1, 2, response, 0, finished=True)
    assert asm.frames == 3 and asm.finished and asm.confirmed.shape == (3, 4) and asm.tentative.shape == (0, 4)


def test_segment_params_reach_the_transport_as_triton_parameters() -> None:
    preset = PRESETS["low"]
    stream, transport = recording_stream(preset, {"onset": 0.6, "min_duration_on": 0.5})
    stream.feed(np.zeros(3 * preset.step_samples, np.float32))
    stream.close()
    assert transport.parameters[0] == {"onset": "0.6", "min_duration_on": "0.5"}  # floats go as strings


def test_feed_rules() -> None:
    preset = PRESETS["low"]
    stream, _ = recording_stream(preset)
    assert stream.feed(np.zeros(100, np.float32), 8000) == []
    with pytest.raises(ValueError, match="one rate per stream"):
        stream.feed(np.zeros(100, np.float32), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        stream.feed(np.zeros(100, np.float32), 0)
    stream.close()
    with pytest.raises(StreamError, match="closed"):
        stream.feed(np.zeros(100, np.float32), 8000)
    assert stream.close() is stream.close()  # idempotent once closed


def test_stream_context_manager_closes_on_success_and_aborts_on_error() -> None:
    preset = PRESETS["low"]
    stream, transport = recording_stream(preset)
    with stream:
        stream.feed(np.zeros(preset.step_samples + 10, np.float32))
    assert stream.closed and transport.sent[-1].end
    assert len(transport.sent) == requests_for(preset, preset.step_samples + 10)

    stream, transport = recording_stream(preset)
    with pytest.raises(RuntimeError):
        with stream:
            stream.feed(np.zeros(2 * preset.step_samples, np.float32))
            raise RuntimeError("client code failed")
    assert stream.closed
    assert [s.end for s in transport.sent] == [False, False, True]  # one END request (abort)
    assert transport.sent[-1].valid == 0 and not transport.sent[-1].start

    stream, transport = recording_stream(preset)
    with pytest.raises(RuntimeError):
        with stream:
            raise RuntimeError("nothing was sent")
    assert transport.sent == []  # a sequence never started needs no END


class FlakyTransport(RecordingTransport):
    """Fails its first request with ``error`` (one transport per try, like a reconnect)."""

    def __init__(self, preset: Preset, error: Optional[Exception], log: List[Tuple[str, int, bool]]) -> None:
        super().__init__(preset)
        self.error, self.log = error, log

    def run(self, steps, sequence_id: int, parameters: Dict[str, Any]) -> Iterator[RawResponse]:
        for index, step in steps:
            self.log.append(("send", sequence_id, step.start))
            if self.error is not None:
                raise self.error
            yield from super().run([(index, step)], sequence_id, parameters)

    def abort(self, index: int, sequence_id: int) -> None:
        self.log.append(("abort", sequence_id, False))


@pytest.mark.parametrize("error", ["unavailable", "timeout", "refused"])
def test_first_request_is_retried_on_a_new_sequence_id(error: str, monkeypatch: pytest.MonkeyPatch) -> None:
    preset = PRESETS["low"]
    errors = {"unavailable": ServerUnavailable("u:1", "grpc", "connection refused"),
              "timeout": RequestTimeout("no answer in time"), "refused": StreamError("bad request")}
    log: List[Tuple[str, int, bool]] = []
    failures = [errors[error], errors[error]]  # the first two tries fail
    client = DiarizationClient("127.0.0.1:1", preset=preset, retry=RetryPolicy(attempts=3, backoff_s=0.01))
    monkeypatch.setattr(client, "_open_transport", lambda: FlakyTransport(preset, failures.pop(0) if failures else None, log))
    monkeypatch.setattr("clients.sortformer_client.client.time.sleep", lambda s: log.append(("sleep", 0, False)))
    stream = client.open_stream()
    first_id = stream.sequence_id
    if error == "refused":  # a refused request is not retried
        with pytest.raises(StreamError, match="bad request"):
            stream.feed(np.zeros(3 * preset.step_samples, np.float32))
        assert stream.retries == 0 and [e[0] for e in log] == ["send"]
        return
    stream.feed(np.zeros(3 * preset.step_samples, np.float32))
    ids = [sid for kind, sid, _ in log if kind == "send"]
    assert stream.retries == 2 and len(set(ids[:3])) == 3 and ids[0] == first_id  # a new id per try
    assert [start for kind, _, start in log if kind == "send"] == [True, True, True, False, False]
    aborted = [sid for kind, sid, _ in log if kind == "abort"]
    assert aborted == (ids[:2] if error == "timeout" else [])  # a START that may still arrive gets END
    assert client.open_streams == 1 and stream.sequence_id == ids[2]
    # later requests are never retried
    failures.append(errors[error])
    monkeypatch.setattr(stream, "_transport", FlakyTransport(preset, errors[error], log))
    with pytest.raises(type(errors[error])):
        stream.feed(np.zeros(preset.step_samples, np.float32))
    assert stream.retries == 2


def test_retry_policy_backoff() -> None:
    policy = RetryPolicy(attempts=4, backoff_s=0.5, max_backoff_s=1.5, jitter=0.0)
    assert [policy.delay(k) for k in range(4)] == [0.5, 1.0, 1.5, 1.5]
    jittery = RetryPolicy(backoff_s=1.0, jitter=0.2)
    assert all(0.8 <= jittery.delay(0) <= 1.2 for _ in range(100))
    assert not NO_RETRY.should_retry(RequestTimeout("x"), 1)
    assert policy.should_retry(ServerUnavailable("u", "grpc", "x"), 3) and not policy.should_retry(ServerUnavailable("u", "grpc", "x"), 4)
    assert not policy.should_retry(ModelUnavailable("x"), 1)
    for bad in (dict(attempts=0), dict(backoff_s=-1), dict(jitter=1.0), dict(backoff_s=9, max_backoff_s=8)):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


# ---- audio conversion --------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_resampling_length_and_content(rate: int) -> None:
    seconds = 2.5
    t_in = np.arange(int(seconds * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 300.0 * t_in)).astype(np.float32)
    out = resample_to_16k(tone, rate)
    assert out.dtype == np.float32
    assert out.size == round(tone.size * 16000 / rate) == resampled_length(tone.size, rate)
    t_out = np.arange(out.size) / 16000
    expected = 0.5 * np.sin(2 * np.pi * 300.0 * t_out)
    middle = slice(1600, out.size - 1600)  # away from the filter's edges
    assert np.max(np.abs(out[middle] - expected[middle])) < 2e-3


def test_resampler_pieces_equal_whole() -> None:
    rng = np.random.default_rng(3)
    audio = (0.2 * rng.standard_normal(44100 * 2 + 17)).astype(np.float32)  # within the +-4 limit
    resampler = Resampler(44100)
    pieces = [resampler.process(p) for p in np.array_split(audio, [1, 2, 999, 44100, 44101, 60000])]
    pieces.append(resampler.flush())
    assert np.array_equal(np.concatenate(pieces), resample_to_16k(audio, 44100))


def test_to_mono_float32_layouts() -> None:
    stereo = np.array([[16384, -16384], [32767, 32767], [-32768, 0]], np.int16)
    mono = to_mono_float32(stereo)
    assert mono.dtype == np.float32
    np.testing.assert_allclose(mono, [0.0, 32767 / 32768, -0.5])
    np.testing.assert_allclose(to_mono_float32(np.array([128, 255, 0], np.uint8)), [0.0, 127 / 128, -1.0])
    np.testing.assert_allclose(to_mono_float32(np.array([[0.25], [0.5]])), [0.25, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        to_mono_float32(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="frames"):
        to_mono_float32(np.zeros((2, 2, 2), np.float32))


def test_stereo_44k_int16_stream_sends_the_resampled_length() -> None:
    preset = PRESETS["low"]
    n = 44100 * 3 + 5
    stereo = (np.random.default_rng(0).integers(-2000, 2000, (n, 2))).astype(np.int16)
    stream, transport = recording_stream(preset)
    for piece in np.array_split(stereo, 7):
        stream.feed(piece, 44100)
    result = stream.close()
    assert result.n_samples == round(n * 16000 / 44100)
    assert sum(s.valid for s in transport.sent) == result.n_samples


# ---- client construction ---------------------------------------------------------------------------
def test_url_and_protocol_normalization() -> None:
    assert normalize_url("localhost", "grpc") == "localhost:8001"
    assert normalize_url("localhost", "http") == "localhost:8000"
    assert normalize_url("grpc://h:9001/", "grpc-stream") == "h:9001"
    assert normalize_url("http://h:9000", "http") == "h:9000"
    assert normalize_url("[::1]", "grpc") == "[::1]:8001"
    with pytest.raises(ValueError, match="TLS"):
        normalize_url("https://h:443", "http")
    with pytest.raises(ValueError, match="protocol"):
        DiarizationClient("h:1", protocol="websocket")
    with pytest.raises(ValueError, match="preset"):
        DiarizationClient("h:1", preset="medium")
    with pytest.raises(ValueError, match="timeout"):
        DiarizationClient("h:1", timeout=0)


def test_sequence_ids_are_random_63_bit_and_unique() -> None:
    ids = [new_sequence_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(0 < i < 2 ** 63 for i in ids)
    assert max(ids) > 2 ** 60  # spread over the 63 bits, not small counters
    client = DiarizationClient("127.0.0.1:1", protocol="grpc")
    streams = [client.open_stream() for _ in range(20)]
    assert len({s.sequence_id for s in streams}) == 20 and client.open_streams == 20
    with pytest.raises(ValueError, match="still open"):
        client.open_stream(sequence_id=streams[0].sequence_id)
    for s in streams:
        s.abort()  # nothing was sent: nothing to end
    assert client.open_streams == 0
    with pytest.raises(ValueError, match="sequence_id"):
        client.open_stream(sequence_id=0)
    with pytest.raises(ValueError, match="2\\*\\*63-1"):  # gRPC carries it as int64 (issue 12)
        client.open_stream(sequence_id=2 ** 63)
    client.close()


# ---- errors against unreachable / silent servers --------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_unavailable_on_a_closed_port(protocol: str) -> None:
    url = f"127.0.0.1:{free_port()}"
    with DiarizationClient(url, protocol=protocol, preset="low", timeout=10) as client:
        with pytest.raises(ServerUnavailable) as info:
            client.diarize(np.zeros(20000, np.float32))
        assert url in str(info.value) and protocol in str(info.value)
        assert info.value.url == url
        with pytest.raises(ServerUnavailable, match=url.replace(".", r"\.")):
            client.check()


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted: List[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    sock.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_request_timeout(protocol: str, silent_server: str) -> None:
    with DiarizationClient(silent_server, protocol=protocol, preset="low", timeout=0.5) as client:
        with pytest.raises(RequestTimeout) as info:
            client.diarize(np.zeros(20000, np.float32))
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, StreamError)
        assert silent_server in str(info.value)


# ---- writers ---------------------------------------------------------------------------------------
def _result() -> Result:
    probs = np.zeros((30, 4), np.float32)
    probs[2:10, 0] = 0.9
    probs[8:20, 2] = 0.8
    segments = (Segment(0.16, 0.8, 0, True), Segment(0.64, 1.6, 2, True))
    return Result(sequence_id=7, preset="low", n_samples=30 * 1280, probs=probs, segments=segments,
                  requests=6, finished=True)


def test_rttm_lines_format_and_round_trip(tmp_path: Path) -> None:
    result = _result()
    lines = rttm_lines("my meeting", result.segments)
    assert lines == [
        "SPEAKER my_meeting 1 0.160 0.640 <NA> <NA> speaker_0 <NA> <NA>",
        "SPEAKER my_meeting 1 0.640 0.960 <NA> <NA> speaker_2 <NA> <NA>",
    ]
    path = tmp_path / "m.rttm"
    write_rttm(path, "my meeting", result.segments)
    turns = read_rttm(path)
    assert turns == [Turn("my_meeting", 0.16, 0.64, "speaker_0"), Turn("my_meeting", 0.64, 0.96, "speaker_2")]
    assert all(len(line.split()) == 10 for line in path.read_text().splitlines())
    write_rttm(path, "empty", [])
    assert path.read_text() == ""


def test_parse_rttm_skips_comments_and_rejects_bad_lines() -> None:
    text = ";; comment\nSPKR-INFO x 1 <NA> <NA> <NA> unknown a <NA>\nSPEAKER x 1 1.5 2 <NA> <NA> a <NA> <NA>\n"
    assert parse_rttm(text) == [Turn("x", 1.5, 2.0, "a")]
    with pytest.raises(ValueError, match="8 fields"):
        parse_rttm("SPEAKER x 1 1.5")
    with pytest.raises(ValueError, match="numbers"):
        parse_rttm("SPEAKER x 1 a b <NA> <NA> s <NA> <NA>")
    with pytest.raises(ValueError, match="negative"):
        parse_rttm("SPEAKER x 1 -1 2 <NA> <NA> s <NA> <NA>")


def test_json_writer(tmp_path: Path) -> None:
    result = _result()
    path = tmp_path / "r.json"
    write_json(path, result, "rec", extra={"audio": {"path": "rec.wav"}})
    data = json.loads(path.read_text())
    assert data["uri"] == "rec" and data["preset"] == "low" and data["n_frames"] == 30
    assert data["frame_seconds"] == pytest.approx(0.08) and data["duration_s"] == pytest.approx(2.4)
    assert data["segments"][0] == {"start": 0.16, "end": 0.8, "duration": 0.64, "speaker": 0, "label": "speaker_0"}
    assert np.allclose(np.array(data["probabilities"]), result.probs)
    assert data["audio"] == {"path": "rec.wav"}
    write_json(path, result, "rec", include_probs=False)
    assert "probabilities" not in json.loads(path.read_text())


# ---- eval (pyannote.metrics) against hand computations --------------------------------------------------
def _turns(uri: str, spans) -> List[Turn]:
    return [Turn(uri, s, e - s, spk) for s, e, spk in spans]


def test_der_and_jer_match_hand_computation() -> None:
    ref = {"r": _turns("r", [(0, 10, "A"), (10, 20, "B")])}
    hyp = {"r": _turns("r", [(0, 12, "x"), (12, 20, "y")])}
    # no collar: 2 s of B labelled as A's speaker -> confusion 2 / 20
    report = evaluate(ref, hyp, collar=0.0)
    (f,) = report.files
    assert (f.scored_s, f.missed_s, f.false_alarm_s, f.confusion_s) == pytest.approx((20, 0, 0, 2))
    assert f.der == pytest.approx(0.1)
    # JER: A<->x 1 - 10/12, B<->y 1 - 8/10, averaged over reference speakers
    assert f.jer == pytest.approx((2 / 12 + 2 / 10) / 2)
    # collar 0.25 s each side of the boundaries at 0, 10, 20: scored 20 - 0.25 - 0.5 - 0.25 = 19,
    # confusion [10.25, 12) = 1.75
    report = evaluate(ref, hyp, collar=0.25)
    (f,) = report.files
    assert f.scored_s == pytest.approx(19.0) and f.confusion_s == pytest.approx(1.75)
    assert f.der == pytest.approx(1.75 / 19)
    assert f.jer == pytest.approx((1.75 / 11.25 + 1.75 / 9.5) / 2)
    assert report.total.der == pytest.approx(1.75 / 19)


def test_eval_total_missing_hypothesis_and_skip_overlap() -> None:
    ref = {"a": _turns("a", [(0, 10, "A"), (6, 16, "B")]), "b": _turns("b", [(0, 4, "S")])}
    hyp = {"a": _turns("a", [(0, 10, "x"), (6, 10, "y")]), "zz": _turns("zz", [(0, 1, "q")])}
    report = evaluate(ref, hyp, collar=0.0)
    a, b = report.files
    assert a.der == pytest.approx(6 / 20)  # B's last 6 s missed
    assert b.der == pytest.approx(1.0) and not b.hyp_found  # no hypothesis: all missed
    assert report.total.der == pytest.approx((6 + 4) / (20 + 4))
    assert report.missing_hyp == ["b"] and report.extra_hyp == ["zz"]
    skipped = evaluate(ref, hyp, collar=0.0, skip_overlap=True)
    assert skipped.files[0].der == pytest.approx(6 / 12)  # the overlap [6, 10) is not scored


# ---- split (NeMo Curator SpeakerSeparation semantics) --------------------------------------------------
def test_exclude_overlaps_trims_a_buffer_next_to_each_overlap() -> None:
    segs = {"A": [(0.0, 5.0)], "B": [(4.0, 9.0)], "C": [(10.0, 12.0)]}
    assert exclude_overlaps(segs, 0.5) == {"A": [(0.0, 3.5)], "B": [(5.5, 9.0)], "C": [(10.0, 12.0)]}
    assert exclude_overlaps(segs, 0.0) == {"A": [(0.0, 4.0)], "B": [(5.0, 9.0)], "C": [(10.0, 12.0)]}
    # a solo stretch shorter than the buffer after an overlap disappears
    assert exclude_overlaps({"A": [(0.0, 5.0)], "B": [(4.0, 5.2)]}, 0.5) == {"A": [(0.0, 3.5)], "B": []}


def test_clean_cut_gives_the_overlap_to_whoever_starts_talking() -> None:
    segs = {"A": [(0.0, 5.0)], "B": [(4.0, 9.0)]}
    assert clean_cut(segs) == {"A": [(0.0, 4.0)], "B": [(4.0, 9.0)]}
    # A talks through B's interjection: A resumes when B stops
    assert clean_cut({"A": [(0.0, 10.0)], "B": [(3.0, 4.0)]}) == {"A": [(0.0, 3.0), (4.0, 10.0)], "B": [(3.0, 4.0)]}


def test_merge_and_min_duration() -> None:
    assert merge_adjacent([(2.5, 3.0), (0.0, 1.0), (1.05, 2.0)], 0.1) == [(0.0, 2.0), (2.5, 3.0)]
    assert merge_adjacent([(0.0, 1.0), (1.125, 2.0)], 0.125) == [(0.0, 2.0)]  # gap <= threshold merges
    assert merge_adjacent([(0.0, 1.0), (1.25, 2.0)], 0.125) == [(0.0, 1.0), (1.25, 2.0)]
    plan = plan_split({"A": [(0.0, 0.8), (2.0, 2.79)], "B": [(5.0, 5.5)]},
                      SplitParams(min_duration=0.8, buffer_time=0.5))
    assert plan == {"A": [(0.0, 0.8)], "B": []}  # kept when duration >= min_duration
    with pytest.raises(ValueError, match="min_duration"):
        SplitParams(min_duration=-1)


def test_separate_keeps_exact_samples_and_silence_elsewhere() -> None:
    rate = 1000
    audio = (np.arange(10 * rate, dtype=np.float32) % 200 - 100) / 200 + 0.001
    audio[7000:9000] = 0.0  # speaker C talks over digital silence: no file for C
    turns = _turns("x", [(0.0, 3.0, "A"), (2.0, 5.0, "B"), (5.2, 6.5, "A"), (7.0, 9.0, "C"), (9.5, 9.9, "B")])
    tracks, num_speakers = separate(audio, rate, turns, SplitParams())
    assert [t.speaker for t in tracks] == ["A", "B"] and num_speakers == 2
    a, b = tracks
    # A until 0.5 s before the overlap at 2 s, and alone at [5.2, 6.5); B from 0.5 s after the overlap
    # ends at 3 s; B's 0.4 s turn at 9.5 s is under min_duration (0.8 s)
    assert a.segments == [(0.0, 1.5), (5.2, 6.5)] and b.segments == [(3.5, 5.0)]
    assert a.duration_s == pytest.approx(2.8) and b.duration_s == pytest.approx(1.5)
    for track in tracks:
        assert track.audio.shape == (audio.size, 1)
        mask = np.zeros(audio.size, bool)
        for s, e in track.segments:
            mask[int(round(s * rate)):int(round(e * rate))] = True
        assert np.array_equal(track.audio[mask, 0], audio[mask])
        assert not track.audio[~mask].any()


def test_separate_min_duration_counts_total_speech() -> None:
    rate = 1000
    audio = np.full(10 * rate, 0.1, np.float32)
    turns = _turns("x", [(0.0, 1.0, "A"), (3.0, 3.6, "B")])
    tracks, n = separate(audio, rate, turns, SplitParams(min_duration=0.5))
    assert [(t.speaker, round(t.duration_s, 3)) for t in tracks] == [("A", 1.0), ("B", 0.6)] and n == 2
    tracks, n = separate(audio, rate, turns, SplitParams(min_duration=0.7))
    assert [t.speaker for t in tracks] == ["A"] and n == 1


def test_split_file_writes_one_wav_per_speaker(tmp_path: Path) -> None:
    audio, turns = conversation(12.0, n_speakers=3, seed=4)
    src = tmp_path / "conv.wav"
    soundfile.write(src, np.stack([audio, 0.5 * audio], axis=1), 22050, subtype="PCM_16")
    rttm = [Turn("conv", t.start, t.end - t.start, f"spk{t.speaker}") for t in turns]
    entries = split_file(src, rttm, tmp_path / "out", SplitParams())
    assert entries, "the conversation has single-speaker turns longer than 0.8 s"
    manifest = json.loads((tmp_path / "out" / "conv_speakers.json").read_text())
    assert manifest["params"]["min_duration"] == 0.8 and len(manifest["speakers"]) == len(entries)
    info = soundfile.info(src)
    assert [e.as_dict() for e in entries] == manifest["speakers"]
    for entry in entries:
        out = soundfile.info(entry.audio_filepath)
        assert (out.frames, out.samplerate, out.channels, out.subtype) == (info.frames, 22050, 2, "PCM_16")
        assert entry.duration_sec >= 0.8 and Path(entry.audio_filepath).name.startswith("conv_spk")
        assert entry.num_speakers == len(entries)


# ---- against the real tiny server -----------------------------------------------------------------------
def test_check_and_served_presets(tiny_server) -> None:
    for protocol, url in (("grpc", tiny_server.grpc_url), ("http", tiny_server.http_url)):
        with DiarizationClient(url, protocol=protocol, preset="low") as client:
            client.check()
            assert client.served_presets() == sorted(PRESETS)
        custom = Preset("not_served", chunk_len=5, right_context=2, left_context=1, fifo_len=40,
                        spkcache_update_period=40, spkcache_len=188)
        with DiarizationClient(url, protocol=protocol, preset=custom) as client:
            with pytest.raises(ModelUnavailable, match="diarizer_not_served"):
                client.check()
            with pytest.raises(ModelUnavailable, match="diarizer_not_served"):
                client.diarize(np.zeros(16000, np.float32))


def test_diarize_file_equals_array_and_stream_updates(tiny_server, tmp_path: Path) -> None:
    audio, _ = conversation(8.0, n_speakers=2, seed=9)
    path = tmp_path / "c.wav"
    soundfile.write(path, audio, 16000, subtype="FLOAT")
    progress: List[tuple] = []
    with DiarizationClient(tiny_server.grpc_url, protocol="grpc-stream", preset="low", max_in_flight=3) as client:
        from_file = client.diarize_file(path, progress=lambda done, total: progress.append((done, total)))
        from_array = client.diarize_file(audio)
        seen: List[Update] = []
        with client.open_stream(on_update=seen.append) as stream:
            returned = stream.feed(audio[:50_000]) + stream.feed(audio[50_000:])
            result = stream.close()
    total = requests_for(PRESETS["low"], audio.size)
    assert progress == [(k, total) for k in range(1, total + 1)]
    np.testing.assert_allclose(from_file.probs, from_array.probs, rtol=0, atol=1e-6)
    assert returned + list(result.tail_updates) == seen
    np.testing.assert_allclose(result.probs, from_array.probs, rtol=0, atol=1e-6)
    assert result.finished and from_file.finished


def test_library_and_cli_never_import_export_torch_or_nemo() -> None:
    """Dependencies point one way: clients use sortformer_triton and tritonclient, never export/torch/nemo."""
    import subprocess
    import sys

    from sortformer_triton.local_server import REPO_ROOT

    code = ("import sys, clients.sortformer_client, clients.diarize.cli, clients.diarize.evaluate, "
            "clients.diarize.split, clients.diarize.plot, clients.diarize.live; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('export', 'torch', 'nemo')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
