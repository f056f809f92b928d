"""End to end: the exported tiny model served by a real tritonserver, driven through the client library.

For every preset and every protocol (gRPC streaming, unary gRPC, HTTP) several streams of different
lengths run concurrently, starting at different times (so Triton's ``oldest`` batcher mixes sequences
of different ages in one batch), each fed in its own arbitrary pieces. Every stream must

- confirm every frame by END (``protocol.expected_frames``), in exactly ``requests_for`` requests;
- equal the in-process ONNX reference (``inprocess.repository_graphs`` on the same model.onnx
  files, ``stream_through``) within 1e-5, and NeMo's own streaming loop
  (``export.reference.nemo_stream``, async_streaming=True, on the same seeded weights) within 1e-4;
- report segments that replay exactly: each response's SEGMENTS equal what the postprocessor logic
  (``segments_codec.StreamPostprocessor``) gives for that response's frames, finalized segments are
  reported once, and their union at END equals ``timeline.segments_from_probs`` over the final
  confirmed predictions (the offline result).

Plus: a sequence id reused after END starts clean; a stream left by an exception sends END; request
parameters set the postprocessor's segment parameters; degenerate lengths (empty, sub-frame, exact
steps) finish correctly.
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from clients.sortformer_client import DiarizationClient, Result, Update, new_sequence_id
from sortformer_triton import contract
from sortformer_triton.inprocess import repository_graphs
from sortformer_triton.local_server import LocalTritonServer
from sortformer_triton.presets import PRESETS, Preset, requests_for
from sortformer_triton.protocol import expected_frames
from sortformer_triton.samples import conversation
from sortformer_triton.segments_codec import StreamPostprocessor, unpack_segments
from sortformer_triton.timeline import Segment, SegmentParams, segments_from_probs

ONNX_ATOL = 1e-5
NEMO_ATOL = 1e-4
PROTOCOLS = ("grpc-stream", "grpc", "http")
STREAM_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Streams of one preset: audio lengths (s), speakers, when each starts (responses of stream 0
    received before it opens) and the piece size (samples) it is fed in."""

    seconds: Tuple[float, ...]
    speakers: Tuple[int, ...]
    start_after: Tuple[int, ...]
    pieces: Tuple[int, ...]


PLANS: Dict[str, Plan] = {
    "ultra_low": Plan((14.1, 16.3, 18.7), (3, 2, 4), (0, 6, 15), (5_000, 3_840, 12_345)),
    # 19.2 s is exactly 40 steps: the stream ends with a 0-sample end-of-audio step
    "low": Plan((15.3, 19.2, 23.7), (2, 3, 4), (0, 4, 11), (7_680, 20_000, 1_111)),
    "high": Plan((21.0, 27.5, 33.1), (3, 4, 2), (0, 1, 2), (160_000, 50_000, 400_000)),
    "very_high": Plan((58.0, 45.3), (4, 3), (0, 1), (500_000, 300_000)),
}


@dataclasses.dataclass
class PresetReference:
    preset: Preset
    audios: List[np.ndarray]
    onnx: List[np.ndarray]
    nemo: List[np.ndarray]


@dataclasses.dataclass
class StreamRun:
    sequence_id: int
    result: Result
    updates: List[Update]


def _audio(preset: str, k: int, seconds: float, speakers: int) -> np.ndarray:
    seed = 1000 * (list(PRESETS).index(preset) + 1) + k
    return conversation(seconds, n_speakers=speakers, seed=seed)[0]


@pytest.fixture(scope="module")
def onnx_reference(tiny_repository: Path, tiny_export_info) -> Callable[[Preset, Sequence[np.ndarray]], List[np.ndarray]]:
    """ONNX Runtime on the served model.onnx files, streams batched together as Triton would."""
    from export.reference import stream_through

    def run(preset: Preset, audios: Sequence[np.ndarray]) -> List[np.ndarray]:
        pre, step = repository_graphs(tiny_repository / "local", preset, int(tiny_export_info["emb_dim"]))
        return [r.preds for r in stream_through(pre, step, preset, list(audios), list(range(len(audios))))]

    return run


@pytest.fixture(scope="module")
def references(onnx_reference, tiny_reference_model) -> Callable[[str], PresetReference]:
    """Per preset (computed once, shared by the three protocols): audio, ONNX and NeMo predictions."""
    from export.reference import nemo_stream

    cache: Dict[str, PresetReference] = {}

    def get(name: str) -> PresetReference:
        if name not in cache:
            preset, plan = PRESETS[name], PLANS[name]
            audios = [_audio(name, k, s, n) for k, (s, n) in enumerate(zip(plan.seconds, plan.speakers))]
            onnx = onnx_reference(preset, audios)
            nemo = [nemo_stream(tiny_reference_model, preset, a).preds for a in audios]
            cache[name] = PresetReference(preset, audios, onnx, nemo)
        return cache[name]

    return get


def _url(server: LocalTritonServer, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def _client(server: LocalTritonServer, protocol: str, preset: str) -> DiarizationClient:
    return DiarizationClient(_url(server, protocol), protocol=protocol, preset=preset,
                             timeout=STREAM_TIMEOUT_S, max_in_flight=4 if protocol == "grpc-stream" else 1)


def run_streams(client: DiarizationClient, audios: Sequence[np.ndarray], start_after: Sequence[int],
                pieces: Sequence[int], sequence_ids: Optional[Sequence[int]] = None) -> List[StreamRun]:
    """Run the streams concurrently (one thread each); stream i opens after stream 0 got start_after[i]
    responses; stream i is fed in pieces of pieces[i] samples."""
    cond = threading.Condition()
    first_responses = [0]
    first_done = [False]
    runs: List[Optional[StreamRun]] = [None] * len(audios)
    errors: List[BaseException] = []

    def worker(i: int) -> None:
        try:
            if start_after[i] > 0:
                with cond:
                    ok = cond.wait_for(lambda: first_responses[0] >= start_after[i] or first_done[0],
                                       timeout=STREAM_TIMEOUT_S)
                assert ok, f"stream 0 never reached {start_after[i]} responses"
            updates: List[Update] = []

            def on_update(update: Update) -> None:
                updates.append(update)
                if i == 0:
                    with cond:
                        first_responses[0] += 1
                        cond.notify_all()

            sid = sequence_ids[i] if sequence_ids is not None else None
            with client.open_stream(sequence_id=sid, on_update=on_update) as stream:
                audio = audios[i]
                for start in range(0, audio.size, pieces[i]):
                    stream.feed(audio[start:start + pieces[i]])
                result = stream.close()
            runs[i] = StreamRun(stream.sequence_id, result, updates)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
        finally:
            if i == 0:
                with cond:
                    first_done[0] = True
                    cond.notify_all()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(audios))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    assert all(r is not None for r in runs), "a stream thread did not finish"
    return [r for r in runs if r is not None]


def _as_f32(segments: Sequence[Segment]) -> List[Tuple[float, float, int]]:
    """Segments as the SEGMENTS tensor carries them (float32 seconds), in time order."""
    return sorted((float(np.float32(s.start)), float(np.float32(s.end)), int(s.speaker)) for s in segments)


def check_segments(run: StreamRun, params: Optional[SegmentParams] = None) -> None:
    """Replay every response through the postprocessor logic; finalized union == offline segments."""
    rows_per_response = contract.segment_rows(PRESETS[run.result.preset].chunk_len)
    replay = StreamPostprocessor(params, rows_per_response)
    reported: List[Segment] = []
    for update in run.updates:
        rows, n = replay.step(update.confirmed, update.n_confirmed, update.tentative, update.n_tentative,
                              update.frame_offset, update.finished, end=update.end).segments
        assert n < rows_per_response, "the replay comparison needs responses below the row budget"
        expected = unpack_segments(rows, n)
        got = list(update.finalized_segments) + list(update.tentative_segments)
        assert got == expected, f"response {update.index}: segments differ from the postprocessor replay"
        assert all(s.finalized for s in update.finalized_segments)
        assert not any(s.finalized for s in update.tentative_segments)
        reported.extend(update.finalized_segments)
    assert list(run.result.segments) == reported
    keys = [(s.start, s.end, s.speaker) for s in reported]
    assert len(keys) == len(set(keys)), "a finalized segment was reported twice"
    assert run.updates[-1].end and not run.updates[-1].tentative_segments
    offline = segments_from_probs(run.result.probs, params)
    assert _as_f32(reported) == _as_f32(offline)


def check_stream(preset: Preset, audio: np.ndarray, run: StreamRun, onnx: np.ndarray, nemo: np.ndarray) -> None:
    result = run.result
    n = audio.size
    assert result.n_samples == n
    assert result.requests == requests_for(preset, n) == len(run.updates)
    assert [u.index for u in run.updates] == list(range(len(run.updates)))
    assert result.finished and run.updates[-1].finished and run.updates[-1].end
    assert sum(u.end for u in run.updates) == 1
    assert result.n_frames == expected_frames(n), "every frame must be confirmed by END"
    offsets = np.cumsum([0] + [u.n_confirmed for u in run.updates])[:-1]
    assert [u.frame_offset for u in run.updates] == offsets.tolist()
    assert all(u.n_confirmed <= preset.chunk_len and u.n_tentative <= max(preset.right_context, 1)
               for u in run.updates)
    assert result.probs.shape == onnx.shape == nemo.shape
    np.testing.assert_allclose(result.probs, onnx, rtol=0, atol=ONNX_ATOL,
                               err_msg=f"{preset.name}: served predictions differ from the ONNX reference")
    np.testing.assert_allclose(result.probs, nemo, rtol=0, atol=NEMO_ATOL,
                               err_msg=f"{preset.name}: served predictions differ from NeMo's streaming loop")
    check_segments(run)


def model_counts(server: LocalTritonServer, model: str) -> Tuple[float, float]:
    """(requests, executions) of a model from Triton's metrics; executions < requests = batching."""
    import re
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found = {}
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        match = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
        assert match, f"{name} of {model} missing from the metrics"
        found[name] = float(match.group(1))
    return found["nv_inference_count"], found["nv_inference_exec_count"]


# ---- the main matrix: presets x protocols -------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("preset_name", list(PRESETS))
def test_interleaved_streams_match_onnx_and_nemo(preset_name: str, protocol: str, tiny_server, references) -> None:
    ref = references(preset_name)
    plan = PLANS[preset_name]
    model = contract.sortformer_name(ref.preset)
    requests_before, executions_before = model_counts(tiny_server, model)
    with _client(tiny_server, protocol, preset_name) as client:
        client.check()
        runs = run_streams(client, ref.audios, plan.start_after, plan.pieces)
    requests, executions = model_counts(tiny_server, model)
    assert requests - requests_before == sum(r.result.requests for r in runs)
    if preset_name in ("ultra_low", "low"):  # many steps: the oldest batcher must have mixed streams
        assert executions - executions_before < requests - requests_before, "no batch held two sequences"
    assert len({r.sequence_id for r in runs}) == len(runs)
    for audio, run, onnx, nemo in zip(ref.audios, runs, ref.onnx, ref.nemo):
        check_stream(ref.preset, audio, run, onnx, nemo)


# ---- sequence lifecycle ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reused_sequence_id_after_end_starts_clean(protocol: str, tiny_server, onnx_reference) -> None:
    preset = PRESETS["low"]
    audio_a = _audio("low", 50, 7.3, 3)
    audio_b = _audio("low", 51, 9.1, 2)
    (ref_a,) = onnx_reference(preset, [audio_a])
    sid = new_sequence_id()
    with _client(tiny_server, protocol, "low") as client:
        first_b = client.diarize(audio_b, sequence_id=sid)
        again_a = client.diarize(audio_a, sequence_id=sid)
        again_b = client.diarize(audio_b, sequence_id=sid)
        fresh_a = client.diarize(audio_a)
    assert first_b.sequence_id == again_a.sequence_id == sid != fresh_a.sequence_id
    np.testing.assert_allclose(again_a.probs, ref_a, rtol=0, atol=ONNX_ATOL)
    np.testing.assert_allclose(again_a.probs, fresh_a.probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(again_b.probs, first_b.probs, rtol=0, atol=1e-6)
    assert _as_f32(again_a.segments) == _as_f32(fresh_a.segments)
    assert _as_f32(again_b.segments) == _as_f32(first_b.segments)


def _continue_without_start(server: LocalTritonServer, preset: Preset, sid: int, end: bool = True) -> str:
    """Send a non-START request for ``sid`` with raw tritonclient; Triton's error text ('' if accepted)."""
    from tests.rawseq import RawSequence

    seq = RawSequence(server.grpc_url, preset, sid, timeout_s=30)
    try:
        return seq.send(np.zeros(preset.step_samples, np.float32), preset.step_samples, end=end).error
    finally:
        seq.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream_left_by_an_exception_sends_end(protocol: str, tiny_server, onnx_reference) -> None:
    preset = PRESETS["low"]
    audio = _audio("low", 60, 6.0, 2)
    sid = new_sequence_id()
    with _client(tiny_server, protocol, "low") as client:
        with pytest.raises(KeyboardInterrupt):
            with client.open_stream(sequence_id=sid) as stream:
                stream.feed(audio[: 3 * preset.step_samples])
                assert stream.requests_sent == 3
                raise KeyboardInterrupt
        assert stream.closed and client.open_streams == 0
        # the sequence ended on the server: continuing it without START is refused
        assert "START" in _continue_without_start(tiny_server, preset, sid)
        result = client.diarize(audio, sequence_id=sid)
    (ref,) = onnx_reference(preset, [audio])
    np.testing.assert_allclose(result.probs, ref, rtol=0, atol=ONNX_ATOL)


def test_unfinished_stream_is_still_open_on_the_server(tiny_server) -> None:
    """The control for the test above: without END, Triton keeps the sequence and accepts a request."""
    preset = PRESETS["low"]
    sid = new_sequence_id()
    with _client(tiny_server, "grpc", "low") as client:
        stream = client.open_stream(sequence_id=sid)
        stream.feed(np.zeros(2 * preset.step_samples, np.float32))
        assert _continue_without_start(tiny_server, preset, sid, end=False) == ""  # accepted
        stream.abort()  # sends END
        assert stream.closed and client.open_streams == 0
        assert "START" in _continue_without_start(tiny_server, preset, sid)


# ---- request parameters and edge lengths ----------------------------------------------------------------
def test_segment_parameters_per_stream(tiny_server) -> None:
    params: Dict[str, Any] = {"min_duration_on": 0.9, "pad_offset": 0.16, "min_duration_off": 0.3}
    audio = _audio("low", 70, 16.0, 3)
    with _client(tiny_server, "grpc", "low") as client:
        updates: List[Update] = []
        with client.open_stream(segment_params=params, on_update=updates.append) as stream:
            stream.feed(audio)
            custom = stream.close()
        default = client.diarize(audio)
    np.testing.assert_allclose(custom.probs, default.probs, rtol=0, atol=1e-6)
    wanted = SegmentParams(**params)
    assert _as_f32(segments_from_probs(custom.probs, wanted)) != _as_f32(segments_from_probs(custom.probs)), \
        "choose parameters that change this audio's segments"
    check_segments(StreamRun(custom.sequence_id, custom, updates), wanted)
    assert _as_f32(default.segments) == _as_f32(segments_from_probs(default.probs))


@pytest.mark.parametrize("n_samples", [0, 150, 1000, 7680, 7681, 2 * 7680 + 5])
def test_degenerate_lengths_finish(n_samples: int, tiny_server, onnx_reference) -> None:
    preset = PRESETS["low"]
    audio = _audio("low", 80, 2.0, 2)[:n_samples]
    with _client(tiny_server, "grpc", "low") as client:
        result = client.diarize(audio)
    (ref,) = onnx_reference(preset, [audio])
    assert result.finished
    assert result.requests == requests_for(preset, n_samples)
    assert result.n_frames == expected_frames(n_samples)
    np.testing.assert_allclose(result.probs, ref, rtol=0, atol=ONNX_ATOL)
    assert _as_f32(result.segments) == _as_f32(segments_from_probs(result.probs))
