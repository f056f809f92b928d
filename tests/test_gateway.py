"""The web gateway (``python -m clients.gateway``): its protocol functions, the WebSocket protocol against
a gateway process backed by the real tiny Triton server, and the page in a real headless Chromium whose
microphone is a wav file (Debian's ``chromium`` + ``chromium-driver``, driven by selenium).

``SORTFORMER_GATEWAY_SCREENSHOT=docs/gateway.png`` makes the browser test keep its screenshot there.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import soundfile

from clients.gateway import messages
from clients.gateway.__main__ import parse_args
from clients.gateway.app import origin_allowed, page_origins
from clients.gateway.session import error_code
from clients.sortformer_client import (
    DiarizationClient,
    ModelUnavailable,
    RequestTimeout,
    Result,
    Segment,
    ServerUnavailable,
    StreamError,
    Update,
)
from sortformer_triton.local_server import REPO_ROOT as ROOT
from sortformer_triton.local_server import free_port, log_tail
from sortformer_triton.presets import get_preset
from sortformer_triton.samples import conversation

SCREENSHOT_ENV = "SORTFORMER_GATEWAY_SCREENSHOT"
SKIP_BROWSER_ENV = "SORTFORMER_SKIP_BROWSER_TESTS"


# ---- the protocol, without a server ----------------------------------------------------------------
def _update(confirmed: int, tentative: int, offset: int = 10) -> Update:
    rng = np.random.default_rng(confirmed * 7 + tentative)
    return Update(index=3, frame_offset=offset, confirmed=rng.random((confirmed, 4), dtype=np.float32),
                  tentative=rng.random((tentative, 4), dtype=np.float32),
                  finalized_segments=(Segment(0.32, 0.72, 1, True),),
                  tentative_segments=(Segment(1.12, 2.0, 0, False), Segment(1.6, 2.0, 2, False)),
                  finished=False, end=False, latency_s=0.0421)


def test_parse_start_defaults_and_validation() -> None:
    start = messages.parse_start({"type": "start", "sample_rate": 48000}, "low")
    assert start == messages.Start(preset="low", sample_rate=48000, segment_params={})
    start = messages.parse_start({"type": "start", "sample_rate": 44100.0, "preset": "high",
                                  "segment_params": {"onset": 0.6, "median_filter_frames": 3}}, "low")
    assert (start.preset, start.sample_rate, start.segment_params) == ("high", 44100, {"onset": 0.6,
                                                                                       "median_filter_frames": 3})
    bad = [
        ({"type": "start"}, "needs 'sample_rate'"),
        ({"type": "start", "sample_rate": "48k"}, "sample_rate"),
        ({"type": "start", "sample_rate": 4000}, "8000..192000"),
        ({"type": "start", "sample_rate": True}, "sample_rate"),
        ({"type": "start", "sample_rate": 16000, "preset": 3}, "'preset'"),
        ({"type": "start", "sample_rate": 16000, "rate": 1}, "unknown field(s) in 'start': rate"),
        ({"type": "start", "sample_rate": 16000, "segment_params": []}, "must be an object"),
        ({"type": "start", "sample_rate": 16000, "segment_params": {"threshold": 0.5}}, "unknown segment parameter"),
        ({"type": "start", "sample_rate": 16000, "segment_params": {"onset": "high"}}, "must be a number"),
        ({"type": "start", "sample_rate": 16000, "segment_params": {"onset": 0.3, "offset": 0.6}},
         "must not exceed onset"),
        ({"type": "start", "sample_rate": 16000, "segment_params": {"median_filter_frames": 2}}, "odd"),
    ]
    for obj, text in bad:
        with pytest.raises(messages.ProtocolError, match=None) as info:
            messages.parse_start(obj, "low")
        assert info.value.code == messages.BAD_MESSAGE and text in str(info.value), (obj, str(info.value))


def test_parse_text_rejects_what_is_not_a_message() -> None:
    assert messages.parse_text('{"type": "stop"}') == {"type": "stop"}
    assert messages.parse_text('{"type": "start", "sample_rate": 8000}')["type"] == "start"
    for text, fragment in (("hello", "JSON"), ("[1, 2]", "JSON object"), ('{"type": "pause"}', "unknown message type"),
                           ('{"sample_rate": 8000}', "unknown message type"), ('{"type": "stop", "now": 1}', "no fields")):
        with pytest.raises(messages.ProtocolError) as info:
            messages.parse_text(text)
        assert info.value.code == messages.BAD_MESSAGE and fragment in str(info.value)


def test_decode_pcm() -> None:
    samples = np.linspace(-1, 1, 1001, dtype=np.float32)
    assert np.array_equal(messages.decode_pcm(samples.astype("<f4").tobytes()), samples)
    assert messages.decode_pcm(b"").size == 0
    for data, fragment in ((b"\x00" * 6, "multiple of 4"),
                           (np.array([0.0, np.nan], "<f4").tobytes(), "NaN"),
                           (np.array([0.0, -5.0], "<f4").tobytes(), "peaks at 5"),  # unscaled: the server refuses it
                           (b"\x00" * (messages.MAX_FRAME_BYTES + 4), "exceeds")):
        with pytest.raises(messages.ProtocolError) as info:
            messages.decode_pcm(data)
        assert info.value.code == messages.BAD_AUDIO and fragment in str(info.value)


def test_update_message_carries_the_update_exactly() -> None:
    update = _update(confirmed=6, tentative=7)
    msg = json.loads(json.dumps(messages.update_message(update, sequence_id=2 ** 62 + 7), allow_nan=False))
    assert msg["type"] == "update" and msg["index"] == 3 and msg["frame_offset"] == 10
    assert np.array_equal(np.asarray(msg["confirmed"], np.float32), update.confirmed)  # float32 survives JSON
    assert np.array_equal(np.asarray(msg["tentative"], np.float32), update.tentative)
    assert msg["tentative_offset"] == 16 and msg["frames_confirmed"] == 16
    assert msg["sequence_id"] == str(2 ** 62 + 7)
    assert msg["finalized_segments"] == [{"start": 0.32, "end": 0.72, "speaker": 1,
                                          "label": "speaker_1"}]
    assert [s["speaker"] for s in msg["tentative_segments"]] == [0, 2]
    # the latest probabilities are those of the newest frame: the last tentative one ...
    assert msg["probabilities"] == update.tentative[-1].tolist() and msg["probabilities_frame"] == 22
    assert msg["latency_ms"] == 42.1 and msg["finished"] is False and msg["end"] is False
    # ... else the last confirmed one, else none
    only_confirmed = messages.update_message(_update(confirmed=3, tentative=0), 3)
    assert only_confirmed["probabilities_frame"] == 12 and len(only_confirmed["probabilities"]) == 4
    empty = messages.update_message(_update(confirmed=0, tentative=0), 0)
    assert empty["probabilities"] is None and empty["probabilities_frame"] is None and empty["confirmed"] == []


def test_result_and_started_messages() -> None:
    probs = np.random.default_rng(1).random((40, 4), dtype=np.float32)
    result = Result(sequence_id=2 ** 62 + 5, preset="low", n_samples=51200, probs=probs,
                    segments=(Segment(2.0, 2.8, 1, True), Segment(0.4, 1.2, 0, True)), requests=9, finished=True)
    msg = json.loads(json.dumps(messages.result_message(result)))
    assert msg["sequence_id"] == str(2 ** 62 + 5) and msg["n_frames"] == 40 and msg["duration_s"] == 3.2
    assert [s["start"] for s in msg["segments"]] == [0.4, 2.0]  # time order
    assert np.array_equal(np.asarray(msg["probabilities"], np.float32), probs)
    started = messages.started_message(get_preset("low"), 2 ** 62 + 5, 48000)
    assert started["sequence_id"] == str(2 ** 62 + 5) and started["latency_seconds"] == pytest.approx(1.04)
    assert started["step_seconds"] == pytest.approx(0.48) and started["frame_seconds"] == 0.08
    assert messages.error_message("busy", "later", False) == {"type": "error", "code": "busy",
                                                              "message": "later", "stream_ended": False}


def test_error_codes_of_the_client_library_exceptions() -> None:
    assert error_code(ServerUnavailable("h:1", "grpc", "refused")) == messages.TRITON_UNAVAILABLE
    assert error_code(ModelUnavailable("no")) == messages.PRESET_UNAVAILABLE
    assert error_code(RequestTimeout("slow")) == messages.TIMEOUT
    assert error_code(StreamError("bad")) == messages.STREAM_FAILED
    assert error_code(messages.ProtocolError(messages.BAD_AUDIO, "x")) == messages.BAD_AUDIO
    assert error_code(KeyError("bug")) == messages.INTERNAL


def test_origin_check() -> None:
    own = page_origins("127.0.0.1", 8080)
    assert own == ("http://127.0.0.1:8080", "http://localhost:8080")
    assert origin_allowed(None, own)  # scripts send no Origin
    assert origin_allowed("http://127.0.0.1:8080", own)  # the gateway's own page
    assert not origin_allowed("https://evil.example", own)  # whatever Host says (DNS rebinding)
    assert origin_allowed("https://app.example", own + ("https://app.example/",))
    assert origin_allowed("https://evil.example", ("*",))
    assert page_origins("gw.example", 443, "https") == ("https://gw.example:443",)


def test_deeply_nested_json_is_a_bad_message() -> None:
    with pytest.raises(messages.ProtocolError, match="nested too deep"):
        messages.parse_text("[" * 100000 + "]" * 100000)


def test_cli_defaults_come_from_the_compose_environment() -> None:
    args = parse_args([], environ={})
    assert (args.host, args.port, args.preset, args.config.triton_url) == ("127.0.0.1", 8080, "low", "127.0.0.1:8001")
    env = {"SORTFORMER_TRITON_URL": "triton:8001", "SORTFORMER_GATEWAY_HOST": "0.0.0.0",
           "SORTFORMER_GATEWAY_PORT": "9090", "SORTFORMER_GATEWAY_PRESET": "high"}
    args = parse_args([], environ=env)
    assert (args.host, args.port, args.preset, args.config.triton_url) == ("0.0.0.0", 9090, "high", "triton:8001")
    args = parse_args(["--triton-url", "grpc://10.0.0.5", "--port", "81", "--preset", "ultra_low"], environ=env)
    assert (args.port, args.config.triton_url, args.config.default_preset) == (81, "10.0.0.5:8001", "ultra_low")
    for bad in (["--preset", "fast"], ["--port", "0"], ["--ssl-certfile", "c.pem"], ["--triton-url", "a/b"]):
        with pytest.raises(SystemExit):
            parse_args(bad, environ={})


# ---- a gateway process against the real tiny server ---------------------------------------------------
class GatewayProcess:
    def __init__(self, triton_url: str, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clients.gateway", "--triton-url", triton_url, "--port", str(self.port),
             "--timeout", "20", *extra], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}: {self.log()}")
            try:
                if http_get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the gateway did not answer /health in 60 s: {self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return log_tail(self.log_path, 4000)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def http_get(url: str) -> Tuple[int, Dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def gateway(tiny_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tiny_server.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield process
    process.stop()


def ws_connect(url: str, **kwargs: Any):
    from websockets.sync.client import connect

    return connect(url, open_timeout=20, max_size=None, **kwargs)


def recv_json(ws: Any, timeout: float = 30.0) -> Dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


def stream_over_websocket(url: str, audio: np.ndarray, rate: int, block: int, preset: str = "low",
                          segment_params: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Every message of one stream (started ... result), the audio sent in ``block``-sample frames."""
    start: Dict[str, Any] = {"type": "start", "preset": preset, "sample_rate": rate}
    if segment_params:
        start["segment_params"] = segment_params
    with ws_connect(url) as ws:
        ws.send(json.dumps(start))
        received = [recv_json(ws)]
        assert received[0]["type"] == "started", received[0]
        for k in range(0, audio.size, block):
            ws.send(audio[k:k + block].astype("<f4").tobytes())
        ws.send(json.dumps({"type": "stop"}))
        while received[-1]["type"] not in ("result", "error"):
            received.append(recv_json(ws))
    return received


def check_stream_equals(received: List[Dict[str, Any]], direct: Result) -> None:
    """What the gateway sent is exactly what the client library gives for the same audio."""
    assert received[-1]["type"] == "result", received[-1]
    result = received[-1]
    updates = [m for m in received if m["type"] == "update"]
    assert [m["type"] for m in received] == ["started"] + ["update"] * len(updates) + ["result"]
    assert [u["index"] for u in updates] == list(range(direct.requests)) and result["requests"] == direct.requests
    assert result["finished"] and updates[-1]["finished"] and updates[-1]["end"]
    assert np.array_equal(np.asarray(result["probabilities"], np.float32), direct.probs)
    confirmed = np.concatenate([np.asarray(u["confirmed"], np.float32).reshape(-1, 4) for u in updates])
    assert np.array_equal(confirmed, direct.probs)
    assert [u["frames_confirmed"] for u in updates] == list(np.cumsum([len(u["confirmed"]) for u in updates]))
    expected = sorted((float(s.start), float(s.end), s.speaker) for s in direct.segments)
    assert [(s["start"], s["end"], s["speaker"]) for s in result["segments"]] == expected
    streamed = sorted((s["start"], s["end"], s["speaker"]) for u in updates for s in u["finalized_segments"])
    assert streamed == expected and len(expected) >= 2
    assert result["n_frames"] == direct.n_frames and result["duration_s"] == pytest.approx(direct.duration_s)


def test_health_ready_and_info(gateway: GatewayProcess) -> None:
    assert http_get(gateway.url + "/health") == (200, {"status": "ok", "connections": 0, "streams": 0,
                                                        "triton_streams": 0})
    status, ready = http_get(gateway.url + "/ready")
    assert status == 200 and ready["status"] == "ready" and "low" in ready["presets"]
    status, info = http_get(gateway.url + "/api/info")
    assert status == 200 and info["default_preset"] == "low" and info["triton"] == "ready"
    assert set(info["presets"]) >= {"ultra_low", "low", "high", "very_high"} and info["frame_seconds"] == 0.08
    with urllib.request.urlopen(gateway.url + "/", timeout=10) as page:
        assert b'src="/static/app.js"' in page.read()
    for asset in ("app.js", "capture-worklet.js", "style.css"):
        with urllib.request.urlopen(f"{gateway.url}/static/{asset}", timeout=10) as response:
            assert response.status == 200 and response.read()


def test_stream_equals_the_client_library(gateway: GatewayProcess, tiny_server) -> None:
    """48 kHz PCM in frames of an odd size: the gateway resamples and re-chunks through the client library
    (gRPC streaming), so updates, confirmed frames and segments equal a direct client's."""
    audio16, _ = conversation(9.0, n_speakers=3, seed=3)
    audio = np.interp(np.arange(audio16.size * 3) / 3.0, np.arange(audio16.size), audio16).astype(np.float32)
    received = stream_over_websocket(gateway.ws_url, audio, 48000, block=4001)
    direct = DiarizationClient(tiny_server.grpc_url, preset="low").diarize(audio, 48000)
    check_stream_equals(received, direct)
    assert received[0]["preset"] == "low" and received[0]["sample_rate"] == 48000
    assert any(u["tentative_segments"] for u in received if u["type"] == "update")


def test_segment_params_reach_the_postprocessor(gateway: GatewayProcess, tiny_server) -> None:
    audio, _ = conversation(8.0, n_speakers=2, seed=4)
    params = {"min_duration_on": 0.8, "min_duration_off": 0.3, "median_filter_frames": 3}
    received = stream_over_websocket(gateway.ws_url, audio, 16000, block=1600, preset="ultra_low",
                                     segment_params=params)
    direct = DiarizationClient(tiny_server.grpc_url, preset="ultra_low").diarize(audio, 16000,
                                                                                  segment_params=params)
    check_stream_equals(received, direct)
    assert all(s["end"] - s["start"] >= 0.8 - 1e-6 for s in received[-1]["segments"])


def test_bad_messages_get_clear_errors_and_the_gateway_keeps_serving(gateway: GatewayProcess,
                                                                     tiny_server) -> None:
    audio, _ = conversation(4.0, n_speakers=2, seed=5)
    with ws_connect(gateway.ws_url) as ws:
        def error_for(payload: Any) -> Dict[str, Any]:
            ws.send(payload)
            msg = recv_json(ws)
            assert msg["type"] == "error", msg
            return msg

        assert error_for("not json")["code"] == "bad_message"
        assert error_for(np.zeros(160, "<f4").tobytes())["code"] == "not_started"
        assert error_for(json.dumps({"type": "stop"}))["code"] == "not_started"
        unknown = error_for(json.dumps({"type": "start", "preset": "fastest", "sample_rate": 16000}))
        assert unknown["code"] == "unknown_preset" and "'fastest'" in unknown["message"]
        assert "low" in unknown["message"] and unknown["stream_ended"] is False
        assert error_for(json.dumps({"type": "start", "sample_rate": 0}))["code"] == "bad_message"
        # the same connection still works; a broken audio frame ends that stream ...
        ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        assert recv_json(ws)["type"] == "started"
        assert error_for(json.dumps({"type": "start", "sample_rate": 16000}))["code"] == "already_started"
        ws.send(audio[:8000].astype("<f4").tobytes())
        ws.send(b"\x00\x01\x02")
        bad = recv_json(ws)
        while bad["type"] == "update":  # updates of the audio before may come first
            bad = recv_json(ws)
        assert bad["type"] == "error" and bad["code"] == "bad_audio" and bad["stream_ended"] is True and "multiple of 4" in bad["message"]
        # ... and another stream on the same connection is served in full
        ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        assert recv_json(ws)["type"] == "started"
        ws.send(audio.astype("<f4").tobytes())
        ws.send(json.dumps({"type": "stop"}))
        msg = recv_json(ws)
        while msg["type"] == "update":
            msg = recv_json(ws)
        assert msg["type"] == "result" and msg["finished"] and msg["n_frames"] == 50
    # other connections were never affected
    direct = DiarizationClient(tiny_server.grpc_url, preset="low").diarize(audio, 16000)
    received = stream_over_websocket(gateway.ws_url, audio, 16000, block=2048)
    assert np.array_equal(np.asarray(received[-1]["probabilities"], np.float32), direct.probs)
    _wait_idle(gateway)


def _wait_idle(gateway: GatewayProcess, timeout: float = 20.0) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = http_get(gateway.url + "/health")[1]
        if health["streams"] == 0 and health["triton_streams"] == 0 and health["connections"] == 0:
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway still holds streams: {health}\n{gateway.log()}")
        time.sleep(0.1)


def test_a_disconnect_aborts_the_stream(gateway: GatewayProcess) -> None:
    audio, _ = conversation(3.0, n_speakers=2, seed=6)
    ws = ws_connect(gateway.ws_url)
    ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
    sequence_id = recv_json(ws)["sequence_id"]
    ws.send(audio.astype("<f4").tobytes())
    assert recv_json(ws)["type"] == "update"  # the Triton sequence is open
    health = http_get(gateway.url + "/health")[1]
    assert health["streams"] == 1 and health["triton_streams"] == 1
    ws.socket.shutdown(socket.SHUT_RDWR)  # the browser tab goes away: no close frame, no stop
    ws.close()
    _wait_idle(gateway)  # the stream was aborted: END sent, the client library released it
    assert f"stream {sequence_id} aborted" in gateway.log()


def test_concurrent_streams_do_not_wait_for_each_other(gateway: GatewayProcess, tiny_server) -> None:
    clips = [conversation(6.0, n_speakers=3, seed=10 + k)[0] for k in range(3)]
    results: Dict[int, Any] = {}

    def run(k: int) -> None:
        try:
            results[k] = stream_over_websocket(gateway.ws_url, clips[k], 16000, block=1600)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            results[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client = DiarizationClient(tiny_server.grpc_url, preset="low")
    for k in range(3):
        assert not isinstance(results[k], BaseException), results[k]
        check_stream_equals(results[k], client.diarize(clips[k], 16000))


def test_a_long_feed_does_not_block_the_event_loop(gateway: GatewayProcess) -> None:
    """8 s of audio in one frame on ultra_low = one feed call of 34 Triton requests (seconds of blocking
    work): it runs on the stream's thread, so the gateway answers HTTP all the while."""
    audio, _ = conversation(8.0, n_speakers=2, seed=7)
    with ws_connect(gateway.ws_url) as ws:
        ws.send(json.dumps({"type": "start", "preset": "ultra_low", "sample_rate": 16000}))
        assert recv_json(ws)["type"] == "started"
        ws.send(audio.astype("<f4").tobytes())
        answered: List[float] = []
        first: Optional[Dict[str, Any]] = None
        while first is None:
            t0 = time.monotonic()
            assert http_get(gateway.url + "/health")[0] == 200
            answered.append(time.monotonic() - t0)
            try:
                first = recv_json(ws, timeout=0.02)
            except TimeoutError:
                pass
        assert first["type"] == "update" and first["index"] == 0
        assert len(answered) >= 3 and max(answered) < 0.5, answered  # answered while the feed ran
        ws.send(json.dumps({"type": "stop"}))
        msg = first
        while msg["type"] == "update":
            msg = recv_json(ws)
        assert msg["type"] == "result" and msg["n_frames"] == 100


def test_triton_down_is_reported_and_the_gateway_stays_up(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    process = GatewayProcess(dead, tmp_path / "gateway.log")
    try:
        status, ready = http_get(process.url + "/ready")
        assert status == 503 and ready["status"] == "unavailable" and dead in ready["error"]
        info = http_get(process.url + "/api/info")[1]
        assert info["triton"] == "unavailable" and info["presets"] == [] and info["error"]
        with ws_connect(process.ws_url) as ws:
            for _ in range(2):  # the connection stays usable after the error
                ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
                msg = recv_json(ws)
                assert msg["type"] == "error" and msg["code"] == "triton_unavailable", msg
                assert dead in msg["message"] and msg["stream_ended"] is False
        assert http_get(process.url + "/health") == (200, {"status": "ok", "connections": 0, "streams": 0,
                                                            "triton_streams": 0})
    finally:
        process.stop()


START_16K = json.dumps({"type": "start", "sample_rate": 16000})


def start_stream(ws: Any) -> Dict[str, Any]:
    """Send a 16 kHz 'start'; its 'started' answer."""
    ws.send(START_16K)
    msg = recv_json(ws)
    assert msg["type"] == "started", msg
    return msg


@contextlib.contextmanager
def one_stream_gateway(triton_url: str, tmp_path: Path, *extra: str) -> Iterator[Tuple[Any, Any]]:
    """A gateway with ``--max-streams 1`` (and ``extra`` flags) and two connections, the first one's stream
    started; afterwards the gateway must hold nothing, and it is stopped."""
    process = GatewayProcess(triton_url, tmp_path / "gateway.log", "--max-streams", "1", *extra)
    try:
        with ws_connect(process.ws_url) as first, ws_connect(process.ws_url) as second:
            start_stream(first)
            yield first, second
        _wait_idle(process)
    finally:
        process.stop()


def test_stream_limits_busy_and_overloaded(tiny_server, tmp_path: Path) -> None:
    """--max-streams: a start beyond it gets 'busy'; --max-pending-seconds: audio piling up faster than
    Triton answers ends the stream as 'overloaded' and frees its place."""
    with one_stream_gateway(tiny_server.grpc_url, tmp_path, "--max-pending-seconds", "0.5") as (first, second):
        second.send(START_16K)
        busy = recv_json(second)
        assert busy["code"] == "busy" and busy["stream_ended"] is False and "1 streams" in busy["message"]
        first.send(np.zeros(16000, "<f4").tobytes())  # 1 s arrives at once: more than 0.5 s waiting
        msg = recv_json(first)
        assert msg["type"] == "error" and msg["code"] == "overloaded" and msg["stream_ended"] is True, msg
        first.send(np.zeros(160, "<f4").tobytes())  # audio after the end says why the stream ended
        msg = recv_json(first)
        assert msg["code"] == "not_started" and "after the stream ended (overloaded)" in msg["message"], msg
        start_stream(second)  # the place is free again
        second.send(json.dumps({"type": "stop"}))  # a stream without audio ends cleanly too
        msg = recv_json(second)
        while msg["type"] == "update":
            msg = recv_json(second)
        assert msg["type"] == "result" and msg["finished"] and msg["n_frames"] == 0


def test_websockets_from_foreign_web_pages_are_refused(gateway: GatewayProcess) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        ws_connect(gateway.ws_url, origin="https://evil.example")
    assert info.value.response.status_code == 403
    # DNS rebinding: evil.example resolves to the gateway; Host and Origin then agree (both evil.example)
    rebound = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
    with pytest.raises(InvalidStatus) as info:
        ws_connect(f"ws://evil.example:{gateway.port}/ws", origin=f"http://evil.example:{gateway.port}",
                   sock=rebound)
    assert info.value.response.status_code == 403
    with ws_connect(gateway.ws_url, origin=gateway.url) as ws:  # the gateway's own page
        ws.send(json.dumps({"type": "stop"}))
        assert recv_json(ws)["code"] == "not_started"
        ws.send("[" * 100000 + "]" * 100000)  # was an uncaught RecursionError: connection dropped (1006)
        msg = recv_json(ws)
        assert msg["code"] == "bad_message" and "nested too deep" in msg["message"], msg


def test_a_stream_without_audio_is_ended_as_idle(tiny_server, tmp_path: Path) -> None:
    """--idle-seconds: 'start' and no audio would hold a gateway place and a Triton slot forever."""
    with one_stream_gateway(tiny_server.grpc_url, tmp_path, "--idle-seconds", "1.5") as (first, second):
        msg = recv_json(first, timeout=20)
        assert msg["code"] == "idle" and msg["stream_ended"] is True, msg
        start_stream(second)  # its place is free


def test_connections_beyond_the_limit_are_refused_with_a_reason(tmp_path: Path) -> None:
    """--max-connections: a WebSocket beyond it gets 'too_many_connections' and close code 1013; the open
    ones keep working, and a closed one's place is free again (no Triton needed)."""
    from websockets.exceptions import ConnectionClosed

    process = GatewayProcess(f"127.0.0.1:{free_port()}", tmp_path / "gateway.log", "--max-connections", "2")
    try:
        with ws_connect(process.ws_url) as first, ws_connect(process.ws_url) as second:
            for ws in (first, second):  # both handlers run (counted) before the third connects
                ws.send(json.dumps({"type": "stop"}))
                assert recv_json(ws)["code"] == "not_started"
            extra = ws_connect(process.ws_url)
            msg = recv_json(extra)
            assert msg["code"] == "too_many_connections" and "2 connections" in msg["message"], msg
            assert "--max-connections" in msg["message"] and msg["stream_ended"] is False
            with pytest.raises(ConnectionClosed) as info:
                extra.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
            first.send(json.dumps({"type": "stop"}))
            assert recv_json(first)["code"] == "not_started"
        with ws_connect(process.ws_url) as again:
            again.send(json.dumps({"type": "stop"}))
            assert recv_json(again)["code"] == "not_started"
        _wait_idle(process)
    finally:
        process.stop()


def test_a_connection_without_a_stream_is_closed_as_idle(tmp_path: Path) -> None:
    """--connection-idle-seconds: a connection that never starts a stream (it holds a --max-connections place)
    gets 'idle' and is closed, its place is free again; a connection that keeps talking is not."""
    from websockets.exceptions import ConnectionClosed

    process = GatewayProcess(f"127.0.0.1:{free_port()}", tmp_path / "gateway.log", "--max-connections", "1",
                             "--connection-idle-seconds", "1.5")
    try:
        with ws_connect(process.ws_url) as silent:
            t0 = time.monotonic()
            msg = recv_json(silent, timeout=15)
            assert msg["code"] == "idle" and msg["stream_ended"] is False and "no stream for 1.5 s" in msg["message"], msg
            assert 1.4 <= time.monotonic() - t0 < 10
            with pytest.raises(ConnectionClosed) as info:
                silent.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1000
        with ws_connect(process.ws_url) as talking:  # the place is free again
            for _ in range(4):  # every message restarts the clock
                time.sleep(0.6)
                talking.send(json.dumps({"type": "stop"}))
                assert recv_json(talking)["code"] == "not_started"
        _wait_idle(process)
    finally:
        process.stop()


# ---- the page in a real headless Chromium ---------------------------------------------------------------
BROWSER_AUDIO_SECONDS = 20.0  # the wav; the test stops after LIVE_SECONDS
LIVE_SECONDS = 11.0


def _browser_paths() -> Tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        if os.environ.get(SKIP_BROWSER_ENV) == "1":
            pytest.skip(f"{SKIP_BROWSER_ENV}=1 and no chromium/chromedriver")
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: scripts/setup.sh installs "
                    "them (apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    browser_path, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    audio, _ = conversation(BROWSER_AUDIO_SECONDS, n_speakers=3, seed=1)
    wav = tmp_path / "conversation.wav"
    soundfile.write(wav, audio, 16000, subtype="PCM_16")
    options = Options()
    options.binary_location = browser_path
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
                "--window-size=1280,800", "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path, log_output=str(tmp_path / "driver.log")))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _page_state(driver: Any) -> Dict[str, Any]:
    return driver.execute_script(
        "const s = window.diarizationState; return Object.assign({}, s, {confirmed: s.confirmed.length});")


def _wait(driver: Any, condition: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not driver.execute_script(f"return Boolean({condition});"):
        if time.monotonic() > deadline:
            raise AssertionError(f"page: {condition!r} not true in {timeout} s; state {_page_state(driver)}; "
                                 f"console {driver.get_log('browser')}")
        time.sleep(0.1)


def _pixels_of_segments(driver: Any, segments: List[Dict[str, Any]]) -> List[List[int]]:
    """The canvas pixel in the middle of each segment's bar (device pixels)."""
    return driver.execute_script("""
        const g = window.diarizationTimeline.geometry();
        const ctx = document.getElementById('timeline').getContext('2d');
        return arguments[0].map((s) => {
            const x = g.left + ((s.start + s.end) / 2 - g.t0) / (g.t1 - g.t0) * g.plotWidth;
            const y = g.barTop[s.speaker] + g.barHeight / 2;
            return Array.from(ctx.getImageData(Math.round(x * g.dpr), Math.round(y * g.dpr), 1, 1).data);
        });""", segments)


def _rgb(color: str) -> List[int]:
    return [int(color[k:k + 2], 16) for k in (1, 3, 5)]


def test_page_in_headless_chromium(gateway: GatewayProcess, browser: Any, tmp_path: Path) -> None:
    """Start, let Chromium's fake microphone (the wav) stream for a while, stop: the page received updates,
    frames were confirmed, segments were drawn where the timeline says, and the result closes the stream."""
    browser.get(gateway.url + "/")
    _wait(browser, "document.getElementById('preset').options.length >= 4 && "
                   "!document.getElementById('start').disabled", 20)
    browser.execute_script("document.getElementById('preset').value = 'low';")
    browser.find_element("id", "start").click()
    _wait(browser, "window.diarizationState.status === 'streaming'", 20)
    seen_tentative = 0
    while browser.execute_script("return window.diarizationState.audioSeconds;") < LIVE_SECONDS:
        seen_tentative = max(seen_tentative, browser.execute_script("return window.diarizationState.drawn.tentative;"))
        time.sleep(0.2)
    live = _page_state(browser)
    live_png = tmp_path / "gateway_live.png"
    assert browser.save_screenshot(str(live_png))
    browser.find_element("id", "stop").click()
    _wait(browser, "window.diarizationState.status === 'done'", 30)
    state = _page_state(browser)
    assert browser.save_screenshot(str(tmp_path / "gateway_done.png"))

    # audio from the wav reached the gateway (not silence), at the page's own sample rate
    assert state["errors"] == [] and state["sequenceId"] and state["sampleRate"] >= 8000
    assert state["rms"] > 0.02, state["rms"]
    result = state["result"]
    assert result["finished"] and result["duration_s"] == pytest.approx(state["audioSeconds"], abs=0.05)
    # updates arrived and confirmed every frame of the stream
    step = get_preset("low").step_seconds
    assert live["updates"] >= 10 and live["framesConfirmed"] >= 80 and live["confirmed"] == live["framesConfirmed"]
    assert state["updates"] == result["requests"] >= int(result["duration_s"] / step)
    assert state["framesConfirmed"] == state["confirmed"] == result["n_frames"]
    assert abs(result["n_frames"] - result["duration_s"] / 0.08) <= 1
    # segments: those finalized while streaming are exactly the result's, and every one was drawn
    streamed = sorted((s["start"], s["end"], s["speaker"]) for s in state["finalized"])
    assert streamed == [(s["start"], s["end"], s["speaker"]) for s in result["segments"]]
    assert len(streamed) >= 2 and live["drawn"]["finalized"] >= 1 and seen_tentative >= 1
    assert state["drawn"] == {"finalized": len(streamed), "tentative": 0, "frames": result["n_frames"]}
    colors = browser.execute_script("return window.diarizationTimeline.colors;")
    wide = [s for s in result["segments"] if s["end"] - s["start"] >= 0.2]
    assert wide and _pixels_of_segments(browser, wide) == [_rgb(colors[s["speaker"]]) + [255] for s in wide]
    # the probability bars show the latest probabilities
    assert len(state["probabilities"]) == 4 and all(0.0 <= p <= 1.0 for p in state["probabilities"])
    shown = [browser.find_element("id", f"prob-value-{k}").text for k in range(4)]
    assert shown == [f"{p:.2f}" for p in state["probabilities"]]
    assert browser.find_element("id", "status").text.startswith("done:")
    _wait_idle(gateway)

    from PIL import Image

    with Image.open(live_png) as image:
        assert image.size[0] == 1280 and image.size[1] >= 600
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        shutil.copyfile(live_png, ROOT / target if not os.path.isabs(target) else target)
