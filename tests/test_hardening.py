"""Hardening against a real tritonserver (issue 7, items 1 and 2): bad requests and isolation.

1. Every bad request gets a clear error and changes nothing: wrong dtype, wrong shape, an empty step,
   NaN/Inf, absurd amplitudes, AUDIO_LENGTH outside 0..step, audio after the end of the audio (the
   preprocessor graph refuses these, the postprocessor names the problem), a first request without
   START, requests after END, an unknown model (Triton refuses these), an unknown preset or an
   unsupported sample rate (the client library refuses these before sending anything). A stream that
   got a refused request goes on and ends with exactly the predictions and segments it has without it.
2. Isolation: 8 streams at once, one of them misbehaving in each of those ways; the other 7 end with
   the predictions and segments of their solo runs.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest

from clients.sortformer_client import DiarizationClient, ModelUnavailable, Result, new_sequence_id
from sortformer_triton.presets import PresetError, get_preset
from sortformer_triton.samples import conversation
from tests.rawseq import RawSequence, solo_run, steps

PRESET = get_preset("low")
STEP = PRESET.step_samples
SECONDS = 7.9
N_GOOD = 7


def _audio(k: int) -> np.ndarray:
    return conversation(SECONDS + 0.37 * k, n_speakers=2 + k % 3, seed=7100 + k)[0]


# name -> (AUDIO sent, AUDIO_LENGTH, dtype, what the error must say); every one is sent mid-stream
BadRequest = Tuple[np.ndarray, int, str, str]
BAD: Dict[str, Callable[[np.ndarray], BadRequest]] = {
    "wrong dtype": lambda a: (a.astype(np.float64), STEP, "FP64", "data-type is 'FP64', but model 'diarizer_low' expects 'FP32'"),
    "wrong shape": lambda a: (np.concatenate([a, a[:1]]), STEP, "FP32", "shape"),
    "empty step": lambda a: (np.zeros(0, np.float32), 0, "FP32", "shape"),
    "nan": lambda a: (np.where(np.arange(STEP) == 99, np.nan, a).astype(np.float32), STEP, "FP32", "NaN"),
    "inf": lambda a: (np.where(np.arange(STEP) == 0, -np.inf, a).astype(np.float32), STEP, "FP32", "infinite"),
    "int16 amplitude": lambda a: ((a * 32767).astype(np.float32), STEP, "FP32", "int16 / 32768"),
    "absurd amplitude": lambda a: (np.full(STEP, 1e30, np.float32), STEP, "FP32", "beyond +-4"),
    "negative length": lambda a: (a, -5, "FP32", "AUDIO_LENGTH is negative"),
    "length over step": lambda a: (a, STEP + 1, "FP32", f"larger than the {STEP} samples"),
}


def _solo(url: str, audio: np.ndarray) -> Tuple[np.ndarray, List]:
    return solo_run(url, PRESET, audio, new_sequence_id())


@pytest.fixture(scope="module")
def solo(tiny_server) -> Dict[int, Tuple[np.ndarray, List]]:
    """Each test audio streamed alone (the references)."""
    return {k: _solo(tiny_server.grpc_url, _audio(k)) for k in range(N_GOOD)}  # the misbehaving stream has none


# ---- 1. each bad request: a clear error, nothing changed ---------------------------------------------
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_request_is_refused_and_the_stream_goes_on(kind: str, tiny_server, solo) -> None:
    audio = _audio(0)
    plan = steps(PRESET, audio)
    seq = RawSequence(tiny_server.grpc_url, PRESET, new_sequence_id())
    try:
        for k, request in enumerate(plan):
            if k in (1, 6):  # refused twice: once early, once after chunks were confirmed
                sent, length, dtype, says = BAD[kind](plan[k].audio)
                reply = seq.send(sent, length, audio_dtype=dtype)
                assert reply.outputs is None and says in reply.error, reply.error
            assert seq.step(request).error == ""
        ref_probs, ref_segments = solo[0]
        np.testing.assert_array_equal(seq.assembler.confirmed, ref_probs)
        assert seq.finalized == ref_segments
    finally:
        seq.close()


def test_audio_after_the_end_of_the_audio_is_refused(tiny_server, solo) -> None:
    audio = _audio(0)
    plan = steps(PRESET, audio)
    end_of_audio = next(k for k, r in enumerate(plan) if r.valid < STEP)
    assert end_of_audio < len(plan) - 1  # flush steps follow
    seq = RawSequence(tiny_server.grpc_url, PRESET, new_sequence_id())
    try:
        for k, request in enumerate(plan):
            assert seq.step(request).error == ""
            if k == end_of_audio:
                reply = seq.send(plan[0].audio, 640)
                assert reply.outputs is None and "after the end of the stream's audio" in reply.error
                assert "may go on" in reply.error
        np.testing.assert_array_equal(seq.assembler.confirmed, solo[0][0])
        assert seq.finalized == solo[0][1]
    finally:
        seq.close()


def test_sequence_protocol_errors(tiny_server) -> None:
    url = tiny_server.grpc_url
    plan = steps(PRESET, _audio(1))
    seq = RawSequence(url, PRESET, new_sequence_id())
    try:
        # a first request without START
        reply = seq.send(plan[1].audio, STEP)
        assert reply.outputs is None and "START" in reply.error
        # a whole stream, then requests after its END
        for request in plan:
            assert seq.step(request).error == ""
        for end in (False, True):
            reply = seq.send(plan[1].audio, STEP, end=end)
            assert reply.outputs is None and "START" in reply.error
    finally:
        seq.close()
    # an unknown model
    other = RawSequence(url, PRESET, new_sequence_id(), model="diarizer_nonexistent")
    try:
        reply = other.send(plan[0].audio, STEP, start=True)
        assert reply.outputs is None and "unknown model" in reply.error.lower()
    finally:
        other.close()


def test_client_refuses_before_sending(tiny_server) -> None:
    with pytest.raises(PresetError, match="unknown preset 'medium'; known: ultra_low, low, high, very_high"):
        DiarizationClient(tiny_server.grpc_url, preset="medium")
    with DiarizationClient(tiny_server.grpc_url, preset="low") as client:
        with client.open_stream() as stream:
            with pytest.raises(ValueError, match="1000..768000"):
                stream.feed(np.zeros(100, np.float32), sample_rate=500)
            with pytest.raises(ValueError, match="NaN or infinite"):
                stream.feed(np.full(100, np.nan, np.float32))
            with pytest.raises(ValueError, match="int16"):
                stream.feed(np.full(100, 20000.0, np.float32))
            assert stream.requests_sent == 0  # nothing reached the server


def test_unserved_model_is_a_clear_client_error(tiny_server) -> None:
    import dataclasses

    preset = dataclasses.replace(get_preset("low"), name="not_served")
    with DiarizationClient(tiny_server.grpc_url, preset=preset) as client:
        with pytest.raises(ModelUnavailable, match="diarizer_not_served.*ready ensembles: diarizer_high"):
            client.check()
        with pytest.raises(ModelUnavailable, match="diarizer_not_served"):
            client.diarize(_audio(0))


# ---- 2. isolation: one misbehaving stream among eight -----------------------------------------------
def _misbehave(kind: str, url: str, stop: threading.Event, errors: List[str]) -> int:
    """Keep misbehaving until ``stop``; every bad request must be refused. Returns the refusals."""
    audio = _audio(N_GOOD)
    plan = steps(PRESET, audio)
    refused = 0
    while not stop.is_set() or refused < 3:
        seq = RawSequence(url, PRESET, new_sequence_id())
        try:
            if kind == "no START":
                reply = seq.send(plan[1].audio, STEP)
                refused += _expect_refused(reply, "START", errors)
                continue
            for k, request in enumerate(plan):
                if kind in BAD and k % 2 == 1 and request.valid == STEP:  # while audio flows
                    sent, length, dtype, says = BAD[kind](request.audio)
                    refused += _expect_refused(seq.send(sent, length, audio_dtype=dtype), says, errors)
                if seq.step(request).error:
                    errors.append(f"{kind}: a valid request of the misbehaving stream failed")
            if kind == "after END":
                refused += _expect_refused(seq.send(plan[1].audio, STEP), "START", errors)
        finally:
            seq.close()
    return refused


def _expect_refused(reply, says: str, errors: List[str]) -> int:
    if reply.outputs is not None or says not in reply.error:
        errors.append(f"expected an error saying {says!r}, got {reply.error!r}")
    return 1


@pytest.mark.parametrize("kind", [*BAD, "no START", "after END"])
def test_one_misbehaving_stream_among_eight(kind: str, tiny_server, solo) -> None:
    url = tiny_server.grpc_url
    results: Dict[int, Result] = {}
    errors: List[str] = []
    stop = threading.Event()
    barrier = threading.Barrier(N_GOOD + 1)

    def good(k: int) -> None:
        try:
            with DiarizationClient(url, protocol="grpc-stream", preset=PRESET) as client:
                with client.open_stream() as stream:
                    barrier.wait(timeout=60)
                    audio = _audio(k)
                    for start in range(0, audio.size, STEP):  # one step per feed: requests interleave
                        stream.feed(audio[start:start + STEP])
                    results[k] = stream.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"good stream {k}: {exc!r}")

    def bad() -> None:
        barrier.wait(timeout=60)
        _misbehave(kind, url, stop, errors)

    threads = [threading.Thread(target=good, args=(k,)) for k in range(N_GOOD)]
    misbehaving = threading.Thread(target=bad)
    for t in threads + [misbehaving]:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    misbehaving.join(timeout=300)
    assert not errors, errors[:5]
    assert sorted(results) == list(range(N_GOOD))
    for k, result in results.items():
        ref_probs, ref_segments = solo[k]
        assert result.finished
        np.testing.assert_allclose(result.probs, ref_probs, rtol=0, atol=1e-6, err_msg=f"stream {k}")
        assert list(result.segments) == ref_segments, f"stream {k}"
