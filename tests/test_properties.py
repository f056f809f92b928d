"""Property tests (hypothesis): how a stream is cut into steps or requests never changes its result.

1. Timeline / postprocessor (no Triton). Random prediction arrays (frames x 4 speakers: saturated 0/1
   values, values exactly at and float32-adjacent to the thresholds, long silences, overlapping
   speakers) and random ``SegmentParams`` over their whole valid ranges are fed to ``Timeline`` and to
   ``StreamPostprocessor`` split into arbitrary steps (0-frame steps, different confirmed counts,
   arbitrary tentative frames that the next step replaces, several ways of ending). Checked against
   ``offline_segments`` below, an *independent* whole-array implementation of the documented rule
   (``sortformer_triton.timeline`` docstring, DESIGN.md "Postprocessor semantics"):

   * the finalized segments of all steps == the offline segments of the whole array (each once);
   * a finalized segment is final: it belongs to the offline result of *every* continuation tried (the
     real one, "the stream ends now", the tentative frames, a random one) and is never reported again;
   * finalization is not lazy: a segment that no future frame can reach is reported in that step;
   * tentative segments == offline(confirmed + tentative) minus the finalized ones (rows: truncated
     after the finalized ones);
   * at END everything is finalized; segments are well formed (0 <= start < end <= audio + pad_offset,
     speakers 0..3, per speaker sorted and apart by >= min_duration_off, each >= min_duration_on).

2. Client re-chunking (no server). ``Stream`` over ``GrpcTransport`` with a fake tritonclient
   (``GrpcTransport`` takes the gRPC client as an argument: the seam). Any split of one recording into
   ``feed`` pieces, at 8/11.025/16/22.05/44.1/48 kHz, mono or stereo, float or int16 PCM, sends
   exactly the requests of feeding it whole (AUDIO and AUDIO_LENGTH tensors, START/END, parameters),
   which are ``iter_steps`` over the whole recording resampled at once, ``requests_for`` many; and the
   client assembles the same ``Result`` from the (simulated) responses.

3. The same against the real local tritonserver serving the tiny model (``tiny_server``): random
   splits (and protocols) of one short recording give bit-identical confirmed predictions and the same
   segments as the unsplit run, at presets ``ultra_low`` and ``low``; the server's segments equal the
   offline reference of its predictions for the requested segment parameters.

Profiles: ``SORTFORMER_HYPOTHESIS_PROFILE=properties-ci`` (default: derandomized, no example
database, failing examples printed with a reproduction blob) or ``properties-dev`` (random, 5x examples).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from clients.sortformer_client import DiarizationClient, Result, Stream, Update, resample_to_16k, to_mono_float32
from clients.sortformer_client.audio import resampled_length
from clients.sortformer_client.transport import GrpcTransport, check_parameters
from sortformer_triton import contract
from sortformer_triton.contract import segment_rows
from sortformer_triton.presets import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    N_SPEAKERS,
    PRESETS,
    Preset,
    output_frames_for,
    requests_for,
)
from sortformer_triton.protocol import iter_steps
from sortformer_triton.proxy import sequence_headers
from sortformer_triton.samples import conversation
from sortformer_triton.segments_codec import SegmentOverflowError, StreamPostprocessor, unpack_segments
from sortformer_triton.timeline import Segment, SegmentParams, Timeline, parse_segment_params

# ---- settings profiles ------------------------------------------------------------------------------
# Registered, not loaded: loading would change the defaults of every other module's hypothesis tests.
settings.register_profile(
    "properties-ci", derandomize=True, database=None, print_blob=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "properties-dev", derandomize=False, print_blob=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_PROFILE = os.environ.get("SORTFORMER_HYPOTHESIS_PROFILE", "properties-ci")
BASE = settings.get_profile(_PROFILE)
SCALE = 5 if _PROFILE == "properties-dev" else 1


def examples(n: int, **kwargs: Any) -> settings:
    return settings(BASE, max_examples=n * SCALE, **kwargs)


# =====================================================================================================
# 1. the offline reference (independent of sortformer_triton.timeline)
# =====================================================================================================
@dataclasses.dataclass(frozen=True)
class RefSegment:
    start: float
    end: float
    speaker: int
    last_raw_end: int  # frame that closed the last raw (hysteresis) segment inside this segment


def median_filter(probs: np.ndarray, window: int) -> np.ndarray:
    """Running median over ``window`` (odd) frames, the first / last frame replicated at the edges."""
    h = window // 2
    if h == 0 or len(probs) == 0:
        return probs
    padded = np.concatenate([np.repeat(probs[:1], h, axis=0), probs, np.repeat(probs[-1:], h, axis=0)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)  # [T, S, window]
    return np.median(windows, axis=-1).astype(np.float32)


def hysteresis(column: np.ndarray, onset: float, offset: float) -> List[Tuple[int, int]]:
    """[start frame, closing frame) runs: start at p > onset, end at the first later p < offset (float32
    comparisons); a run still open at the end closes at the end of the last frame."""
    on, off = float(np.float32(onset)), float(np.float32(offset))  # float32 values, compared exactly
    runs: List[Tuple[int, int]] = []
    start: Optional[int] = None
    for i, v in enumerate(np.asarray(column, np.float32).tolist()):
        if start is None:
            if v > on:
                start = i
        elif v < off:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(column)))
    return runs


def offline_segments(probs: np.ndarray, params: SegmentParams) -> List[RefSegment]:
    """The documented rule over a whole array: median, hysteresis, pads (+ merge of what overlaps or
    touches), drop shorter than min_duration_on, then fill gaps shorter than min_duration_off."""
    p = np.asarray(probs, np.float32)
    filtered = median_filter(p, params.median_filter_frames)
    fs = params.frame_seconds
    out: List[RefSegment] = []
    for speaker in range(p.shape[1]):
        merged: List[List[Any]] = []  # [start s, end s, last raw end frame]
        for s, e in hysteresis(filtered[:, speaker], params.onset, params.offset):
            start, end = max(0.0, s * fs - params.pad_onset), e * fs + params.pad_offset
            if merged and merged[-1][1] >= start:
                merged[-1][1] = max(merged[-1][1], end)
                merged[-1][2] = e
            else:
                merged.append([start, end, e])
        kept = [m for m in merged if m[1] - m[0] >= params.min_duration_on]
        filled: List[List[Any]] = []
        for m in kept:
            if filled and m[0] - filled[-1][1] < params.min_duration_off:
                filled[-1][1] = max(filled[-1][1], m[1])
                filled[-1][2] = m[2]
            else:
                filled.append(list(m))
        out.extend(RefSegment(a, b, speaker, e) for a, b, e in filled)
    return out


def raw_starts(probs: np.ndarray, params: SegmentParams) -> List[List[int]]:
    """Per speaker, the start frames of the hysteresis runs over the whole (filtered) array."""
    filtered = median_filter(np.asarray(probs, np.float32), params.median_filter_frames)
    return [[s for s, _ in hysteresis(filtered[:, k], params.onset, params.offset)]
            for k in range(filtered.shape[1])]


Key = Tuple[float, float, int]


def key(seg: Any) -> Key:
    return (seg.start, seg.end, seg.speaker)


def key32(seg: Any) -> Key:
    """A segment as the SEGMENTS rows carry it (float32 seconds)."""
    return (float(np.float32(seg.start)), float(np.float32(seg.end)), int(seg.speaker))


def offline_keys(probs: np.ndarray, params: SegmentParams) -> Set[Key]:
    return {key(s) for s in offline_segments(probs, params)}


def check_well_formed(segments: Sequence[Any], n_frames: int, params: SegmentParams, n_speakers: int) -> None:
    """Well-formed final segments of a stream of ``n_frames`` frames."""
    fs = params.frame_seconds
    for s in segments:
        assert 0 <= s.speaker < n_speakers
        assert 0.0 <= s.start < s.end <= n_frames * fs + params.pad_offset + 1e-9, s
        assert s.end - s.start >= params.min_duration_on, f"{s} is shorter than min_duration_on"
    for speaker in range(n_speakers):
        mine = sorted((s.start, s.end) for s in segments if s.speaker == speaker)
        for (a0, a1), (b0, b1) in zip(mine, mine[1:]):
            assert a1 < b0, f"speaker {speaker}: {a0, a1} and {b0, b1} overlap or touch"
            assert b0 - a1 >= params.min_duration_off, f"speaker {speaker}: gap {b0 - a1} < min_duration_off"


# ---- strategies ------------------------------------------------------------------------------------
# multiples of the frame lengths below (0.125 s and 0.0625 s frames make every time exact in binary, so
# ties such as "gap == min_duration_off" really occur)
SPECIAL_SECONDS = [0.0, 0.04, 0.0625, 0.08, 0.1, 0.125, 0.16, 0.24, 0.25, 0.3, 0.375, 0.5, 1.0]


def seconds(max_value: float) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([v for v in SPECIAL_SECONDS if v <= max_value]),
                     st.floats(0.0, max_value, allow_nan=False, allow_infinity=False))


@st.composite
def segment_params(draw: st.DrawFn) -> SegmentParams:
    """Any valid parameters: thresholds in [0, 1] with offset <= onset (also equal, 0 and 1)."""
    onset = draw(st.one_of(st.sampled_from([0.5, 0.0, 1.0, 0.3, 0.7, 0.9]), st.floats(0.0, 1.0)))
    offset = draw(st.one_of(st.just(onset), st.sampled_from([v for v in (0.0, 0.2, 0.5) if v <= onset]),
                            st.floats(0.0, onset)))
    return SegmentParams(
        onset=onset, offset=offset,
        pad_onset=draw(seconds(1.0)), pad_offset=draw(seconds(1.0)),
        min_duration_on=draw(seconds(1.5)), min_duration_off=draw(seconds(1.5)),
        median_filter_frames=draw(st.sampled_from([1, 1, 3, 5, 7, 11])),
        frame_seconds=draw(st.sampled_from([FRAME_SECONDS, FRAME_SECONDS, 0.125, 0.0625, 0.04, 0.1])),
    )


def probability_levels(params: SegmentParams) -> List[float]:
    """Saturated values, the thresholds themselves and their float32 neighbours, 0.5."""
    levels = {0.0, 1.0, 0.5}
    for t in (params.onset, params.offset):
        t32 = np.float32(t)
        levels |= {float(t32), float(np.nextafter(t32, np.float32(0))), float(np.nextafter(t32, np.float32(1)))}
    return sorted(v for v in levels if 0.0 <= v <= 1.0)


@st.composite
def prob_arrays(draw: st.DrawFn, params: SegmentParams, max_frames: int, min_frames: int = 0) -> np.ndarray:
    """[frames, 4] float32: per speaker, runs of special levels, random values and long silences."""
    n = draw(st.integers(min_frames, max_frames))
    levels = probability_levels(params)
    value = st.one_of(st.sampled_from(levels), st.floats(0.0, 1.0, width=32))
    columns = []
    for _ in range(N_SPEAKERS):
        column: List[float] = []
        while len(column) < n:
            kind = draw(st.sampled_from(["run", "run", "silence", "noise"]))
            if kind == "silence":
                column += [0.0] * draw(st.integers(5, 60))
            elif kind == "noise":
                column += draw(st.lists(value, min_size=1, max_size=8))
            else:
                column += [draw(value)] * draw(st.integers(1, 12))
        columns.append(column[:n])
    return np.array(columns, np.float32).T.reshape(n, N_SPEAKERS)


@dataclasses.dataclass
class StepPlan:
    """A stream cut into steps: confirmed frames per step and the tentative frames each step carries."""

    probs: np.ndarray
    sizes: List[int]
    tentative: List[np.ndarray]
    continuations: List[np.ndarray]  # per step, a random continuation (for "final means final")
    ending: str  # "finalize" | "finished_flag" | "end_step"


@st.composite
def step_plans(draw: st.DrawFn, params: SegmentParams, max_frames: int = 100) -> StepPlan:
    probs = draw(prob_arrays(params, max_frames))
    max_step = draw(st.sampled_from([1, 3, 6, 13, 40]))
    sizes: List[int] = []
    while sum(sizes) < len(probs):
        sizes.append(min(draw(st.integers(0, max_step)), len(probs) - sum(sizes)))
    sizes += [0] * draw(st.integers(0 if sizes else 1, 2))  # waiting / flush steps at the end
    # per step, one of a few tentative arrays / continuations (drawing one per step makes examples slow)
    tentative_pool = [draw(prob_arrays(params, max_frames=8)) for _ in range(3)]
    continuation_pool = [draw(prob_arrays(params, max_frames=25, min_frames=1)) for _ in range(2)]
    tentative = [tentative_pool[draw(st.integers(0, 2))] for _ in sizes]
    continuations = [continuation_pool[i % 2] for i in range(len(sizes))]
    ending = draw(st.sampled_from(["finalize", "finished_flag", "end_step"]))
    return StepPlan(probs, sizes, tentative, continuations, ending)


@st.composite
def timeline_cases(draw: st.DrawFn) -> Tuple[SegmentParams, StepPlan]:
    params = draw(segment_params())
    return params, draw(step_plans(params))


# ---- explicit examples (boundary cases, always run) -----------------------------------------------
def _case(params: SegmentParams, columns: Sequence[Sequence[float]], sizes: Sequence[int],
          ending: str = "finalize") -> Tuple[SegmentParams, StepPlan]:
    n = len(columns[0])
    probs = np.zeros((n, N_SPEAKERS), np.float32)
    for k, column in enumerate(columns):
        probs[:, k] = column
    empty = np.zeros((0, N_SPEAKERS), np.float32)
    silence = np.zeros((1, N_SPEAKERS), np.float32)
    return params, StepPlan(probs, list(sizes), [empty] * len(sizes), [silence] * len(sizes), ending)


# a segment [0, 0.375) that is final as soon as 5 frames are settled: anything new starts at 0.625 s or
# later, a gap of exactly min_duration_off (binary-exact times: 0.125 s frames)
EXACT_GAP = _case(SegmentParams(min_duration_on=0.0, min_duration_off=0.25, frame_seconds=0.125),
                  [[0.9] * 3 + [0.0] * 12], [4, 1, 1, 1, 1, 7])
# values exactly at onset == offset never switch; the median filter bridges a one-frame dropout
AT_THRESHOLD = _case(SegmentParams(median_filter_frames=3, min_duration_on=0.0, min_duration_off=0.0),
                     [[0.5, 0.9, 0.9, 0.2, 0.9, 0.5, 0.5, 0.1, 0.1, 0.1]], [1] * 10, "finished_flag")


# ---- the streaming drivers ---------------------------------------------------------------------------
def settled_after(n_confirmed: int, params: SegmentParams) -> int:
    return max(0, n_confirmed - params.half_window)


def must_be_final(ref: Sequence[RefSegment], starts: List[List[int]], settled: int,
                  params: SegmentParams) -> Set[Key]:
    """Offline segments no continuation can change once ``settled`` frames went through hysteresis:
    their raw runs closed before ``settled``, no later run started yet, and anything that starts from
    frame ``settled`` on lands after them (padded) with a gap >= min_duration_off."""
    frontier = max(0.0, settled * params.frame_seconds - params.pad_onset)
    out: Set[Key] = set()
    for seg in ref:
        if seg.last_raw_end > settled - 1:
            continue
        if any(seg.last_raw_end < s <= settled - 1 for s in starts[seg.speaker]):
            continue
        if frontier > seg.end and frontier - seg.end >= params.min_duration_off:
            out.add(key(seg))
    return out


@examples(120)
@example(EXACT_GAP)
@example(AT_THRESHOLD)
@given(timeline_cases())
def test_timeline_any_split_equals_the_offline_reference(case: Tuple[SegmentParams, StepPlan]) -> None:
    params, plan = case
    probs = plan.probs
    ref = offline_segments(probs, params)
    expected = {key(s) for s in ref}
    starts = raw_starts(probs, params)
    timeline = Timeline(params)
    reported: List[Segment] = []
    offset = 0
    settled = 0
    last = len(plan.sizes) - 1
    for i, (size, tent) in enumerate(zip(plan.sizes, plan.tentative)):
        confirmed = probs[offset: offset + size]
        if plan.ending == "finished_flag" and i == last:
            result = timeline.update(confirmed, tent[:0], offset, finished=True)
            offset += size
            assert result.tentative == []
            reported += result.finalized
            break
        result = timeline.update(confirmed, tent, offset)
        offset += size
        settled = max(settled, settled_after(offset, params))
        assert all(s.finalized for s in result.finalized) and not any(s.finalized for s in result.tentative)
        assert [key(s) for s in result.finalized] == sorted(key(s) for s in result.finalized)
        reported += result.finalized
        done = [key(s) for s in reported]
        assert len(set(done)) == len(done), "a finalized segment was reported twice"
        # final means final: the segment is in the result of every continuation
        prefix = probs[:offset]
        for continuation in (probs[offset:], prefix[:0], tent, plan.continuations[i]):
            whole = offline_keys(np.concatenate([prefix, continuation]), params)
            missing = set(done) - whole
            assert not missing, f"finalized {missing} but a continuation of {len(continuation)} frames changes it"
        # and not lazy: what nothing can reach any more is reported now
        late = must_be_final(ref, starts, settled, params) - set(done)
        assert not late, f"after {offset} frames these segments cannot change but are not finalized: {late}"
        # the tentative view: offline(confirmed + tentative) minus what is final
        with_tentative = offline_keys(np.concatenate([prefix, tent]), params)
        assert sorted(key(s) for s in result.tentative) == sorted(with_tentative - set(done))
    if plan.ending != "finished_flag":
        end = timeline.finalize()
        assert end.tentative == []
        reported += end.finalized
    assert timeline.finished and offset == len(probs)
    assert sorted(key(s) for s in reported) == sorted(expected), "streamed != offline reference"
    assert len(reported) == len(expected), "a segment was reported twice"
    check_well_formed(reported, len(probs), params, N_SPEAKERS)
    for speaker in range(N_SPEAKERS):  # each speaker's segments are reported in time order
        mine = [s.start for s in reported if s.speaker == speaker]
        assert mine == sorted(mine)
    assert timeline.finalize().finalized == [] and timeline.finalized_segments == reported
    np.testing.assert_array_equal(timeline.confirmed_probs, probs)


def _rows_step(post: StreamPostprocessor, max_rows: int, conf: np.ndarray, tent: np.ndarray, offset: int,
               chunk: int, right: int, finished: bool, end: bool) -> List[Segment]:
    """One postprocessor request as the ensemble sends it: fixed-size tensors with a batch dim, rows
    after the counts holding garbage (NaN) that must be ignored."""
    conf_rows = np.full((1, chunk, N_SPEAKERS), np.nan, np.float32)
    conf_rows[0, : len(conf)] = conf
    tent_rows = np.full((1, right, N_SPEAKERS), np.nan, np.float32)
    tent_rows[0, : len(tent)] = tent
    rows, n = post.step(conf_rows, np.array([[len(conf)]], np.int32), tent_rows,
                        np.array([[len(tent)]], np.int32), np.array([[offset]], np.int64), finished, end).segments
    assert rows.shape == (max_rows, 4) and rows.dtype == np.float32
    assert not rows[n:].any(), "rows after N_SEGMENTS must be zero"
    got = unpack_segments(rows, n)
    flags = [s.finalized for s in got]
    assert flags == sorted(flags, reverse=True), "finalized rows come first"
    return got


@examples(80)
@example(EXACT_GAP, 1)
@given(timeline_cases(), st.sampled_from([segment_rows(6), 1, 2, 5]))
def test_postprocessor_rows_any_split_equal_the_offline_reference(
    case: Tuple[SegmentParams, StepPlan], max_rows: int
) -> None:
    """The Triton model's per-sequence path: SEGMENTS rows (float32), row budget, END / FINISHED."""
    params, plan = case
    probs = plan.probs
    ref = offline_segments(probs, params)
    expected = [key32(s) for s in ref]
    starts = raw_starts(probs, params)
    chunk = max(max(plan.sizes), 1)
    right = max(max(len(t) for t in plan.tentative), 1)
    post = StreamPostprocessor(params, max_rows=max_rows)
    delivered: List[Key] = []
    offset = 0
    last = len(plan.sizes) - 1
    for i, (size, tent) in enumerate(zip(plan.sizes, plan.tentative)):
        if i == last and plan.ending == "end_step":
            break  # the END request below carries these frames
        finished = plan.ending == "finished_flag" and i == last
        conf = probs[offset: offset + size]
        got = _rows_step(post, max_rows, conf, tent[:0] if finished else tent, offset, chunk, right, finished, False)
        offset += size
        finals = [key32(s) for s in got if s.finalized]
        delivered += finals
        if not finished:
            # tentative rows: offline(confirmed + tentative) minus the finalized segments, in reporting
            # order, as many as fit after the finalized rows (none while finals wait for rows)
            done = set(delivered)
            view = sorted(offline_segments(np.concatenate([probs[:offset], tent]), params),
                          key=lambda s: (s.start, s.end, s.speaker))
            want = [k for k in map(key32, view) if k not in done][: max_rows - len(finals)]
            assert [key32(s) for s in got if not s.finalized] == want
            if not post.packer.pending:  # every segment that cannot change any more has been sent
                final_now = must_be_final(ref, starts, settled_after(offset, params), params)
                assert {key32(s) for s in ref if key(s) in final_now} <= done
    while post.packer.pending:  # finalized segments that did not fit go out first in later responses
        delivered += [key32(s) for s in _rows_step(post, max_rows, probs[:0], probs[:0], offset, chunk, right,
                                                   plan.ending == "finished_flag", False)]
    conf = probs[offset:] if plan.ending == "end_step" else probs[:0]
    tent = plan.tentative[last] if plan.ending == "end_step" else probs[:0]
    remaining = len(expected) - len(delivered)
    if remaining > max_rows:
        with pytest.raises(SegmentOverflowError, match="last response"):
            _rows_step(post, max_rows, conf, tent, offset, chunk, right, False, True)
        return
    got = _rows_step(post, max_rows, conf, tent, offset, chunk, right, False, True)
    assert all(s.finalized for s in got), "END carries no tentative segments"
    delivered += [key32(s) for s in got]
    assert sorted(delivered) == sorted(expected)
    assert len(set(delivered)) == len(delivered)


# =====================================================================================================
# 2. client re-chunking, against a simulated server behind the real GrpcTransport
# =====================================================================================================
@dataclasses.dataclass(frozen=True)
class WireRequest:
    """One request as it reached tritonclient: tensors, sequence flags, parameters."""

    sequence_id: int
    audio: np.ndarray  # AUDIO [1, step_samples] float32
    length: np.ndarray  # AUDIO_LENGTH [1, 1] int64
    start: bool
    end: bool
    parameters: Optional[Dict[str, Any]]


def wire_tensor(inp: Any) -> np.ndarray:
    """The tensor a ``tritonclient.grpc.InferInput`` carries (its raw contents, as put on the wire)."""
    dtype = {"FP32": np.float32, "INT64": np.int64}[inp.datatype()]
    return np.frombuffer(inp._get_content(), dtype=dtype).reshape(inp.shape()).copy()


def fake_probs(audio16: np.ndarray, first: int, count: int) -> np.ndarray:
    """Deterministic 'predictions' of frames [first, first + count) from their audio."""
    out = np.zeros((count, N_SPEAKERS), np.float32)
    for j in range(count):
        frame = audio16[(first + j) * FRAME_SAMPLES:(first + j + 1) * FRAME_SAMPLES]
        level = float(np.sqrt(np.mean(frame.astype(np.float64) ** 2))) if frame.size else 0.0
        out[j] = [min(1.0, level * g) for g in (3.0, 6.0, 12.0, 24.0)]
    return out


class FakeTritonGrpc:
    """Stands in for ``tritonclient.grpc.InferenceServerClient`` (``infer`` only), simulating one
    diarizer ensemble: checks the wire protocol, confirms chunk_len frames per request once their right
    context arrived (all the rest after the end of the audio), and runs the real postprocessor logic."""

    def __init__(self, preset: Preset) -> None:
        self.preset = preset
        self.requests: List[WireRequest] = []
        self._audio: List[np.ndarray] = []
        self._audio_ended = False
        self._confirmed = 0
        self._ended = False
        self._post: Optional[StreamPostprocessor] = None

    def infer(self, model_name: str, inputs: Sequence[Any], outputs: Any = None, request_id: str = "",
              sequence_id: int = 0, sequence_start: bool = False, sequence_end: bool = False,
              client_timeout: Any = None, parameters: Optional[Dict[str, Any]] = None,
              headers: Optional[Dict[str, str]] = None) -> "FakeResult":
        p = self.preset
        assert model_name == contract.ensemble_name(p)
        # every request names its sequence for a proxy in front of replicas (sortformer_triton.proxy)
        assert headers == sequence_headers(sequence_id), "the x-sequence-id header is missing or wrong"
        tensors = {inp.name(): wire_tensor(inp) for inp in inputs}
        assert sorted(tensors) == sorted([contract.AUDIO, contract.AUDIO_LENGTH])
        audio, length = tensors[contract.AUDIO], tensors[contract.AUDIO_LENGTH]
        assert audio.shape == (1, p.step_samples) and audio.dtype == np.float32
        assert length.shape == (1, 1) and length.dtype == np.int64
        valid = int(length[0, 0])
        assert 0 <= valid <= p.step_samples and not audio[0, valid:].any(), "padding must be zeros"
        assert request_id == str(len(self.requests))
        assert sequence_start == (not self.requests), "START on the first request only"
        assert not self._ended, "a request after END"
        assert (parameters is not None) <= sequence_start, "parameters go with START only"
        if self._audio_ended:
            assert valid == 0, "audio after the end-of-audio step"
        self.requests.append(WireRequest(sequence_id, audio, length, sequence_start, sequence_end,
                                         parameters))
        if sequence_start:
            self._post = StreamPostprocessor(parse_segment_params(parameters or {}), segment_rows(p.chunk_len))
        self._audio.append(audio[0, :valid])
        self._audio_ended = self._audio_ended or valid < p.step_samples
        audio16 = np.concatenate(self._audio)
        if self._audio_ended:
            ready = output_frames_for(audio16.size)
        else:
            ready = max(0, audio16.size // FRAME_SAMPLES - p.right_context)
        offset = self._confirmed
        n_conf = min(p.chunk_len, ready - offset)
        self._confirmed += n_conf
        n_tent = min(p.right_context, ready - self._confirmed) if not self._audio_ended else 0
        finished = self._audio_ended and self._confirmed == ready
        conf = fake_probs(audio16, offset, n_conf)
        tent = 1.0 - fake_probs(audio16, self._confirmed, n_tent)
        out = {
            contract.CONFIRMED: np.zeros((1, p.chunk_len, N_SPEAKERS), np.float32),
            contract.N_CONFIRMED: np.array([[n_conf]], np.int32),
            contract.TENTATIVE: np.zeros((1, max(p.right_context, 1), N_SPEAKERS), np.float32),
            contract.N_TENTATIVE: np.array([[n_tent]], np.int32),
            contract.FRAME_OFFSET: np.array([[offset]], np.int64),
            contract.FINISHED: np.array([[int(finished)]], np.int32),
        }
        out[contract.CONFIRMED][0, :n_conf] = conf
        out[contract.TENTATIVE][0, :n_tent] = tent
        rows, n_rows = self._post.step(out[contract.CONFIRMED], out[contract.N_CONFIRMED],
                                       out[contract.TENTATIVE], out[contract.N_TENTATIVE], offset,
                                       finished, sequence_end).segments
        out[contract.SEGMENTS] = rows[None]
        out[contract.N_SEGMENTS] = np.array([[n_rows]], np.int32)
        out[contract.SPEAKER_NAMES] = np.array([[b""] * N_SPEAKERS], dtype=object)
        out[contract.SAVED_PROFILE] = np.zeros((1, 1), np.float32)  # no request of these asks to save
        out[contract.SAVED_PROFILE_HEADER] = np.zeros((1, contract.PROFILE_HEADER_LEN), np.int64)
        self._ended = sequence_end
        return FakeResult(out)


class FakeResult:
    def __init__(self, outputs: Dict[str, np.ndarray]) -> None:
        self._outputs = outputs

    def as_numpy(self, name: str) -> Optional[np.ndarray]:
        return self._outputs.get(name)


SEQUENCE_ID = 0x5EED_0000_0001


def run_stream(preset: Preset, pieces: Sequence[np.ndarray], rate: int,
               segment_params: Optional[Dict[str, Any]]) -> Tuple[Result, List[Update], FakeTritonGrpc]:
    """Feed ``pieces`` through a real ``Stream`` + ``GrpcTransport``; the fake server records the wire."""
    server = FakeTritonGrpc(preset)
    client = DiarizationClient("127.0.0.1:1", protocol="grpc", preset=preset)
    transport = GrpcTransport(client.url, client.model_name, preset, client.timeout, server)
    updates: List[Update] = []
    stream = Stream(client, transport, SEQUENCE_ID, check_parameters(segment_params), updates.append)
    returned: List[Update] = []
    for piece in pieces:
        returned += stream.feed(piece, rate)
    result = stream.close()
    assert _same_updates(returned + list(result.tail_updates), updates)
    client.close()
    return result, updates, server


def _update_fields(u: Update) -> tuple:
    return (u.index, u.frame_offset, u.confirmed.tobytes(), u.tentative.tobytes(), u.finalized_segments,
            u.tentative_segments, u.finished, u.end)  # not latency_s


def _same_updates(a: Sequence[Update], b: Sequence[Update]) -> bool:
    return [_update_fields(u) for u in a] == [_update_fields(u) for u in b]


LAYOUTS = ("mono_f32", "stereo_f32", "mono_i16", "stereo_i16", "column_f64")


def make_audio(n: int, layout: str, seed: int) -> np.ndarray:
    """``n`` frames of speech-like bursts (so the fake server finds segments) in a PCM layout."""
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0.0, 0.4, size=n // 4000 + 1) * (rng.random(n // 4000 + 1) < 0.6), 4000)[:n]
    mono = envelope * rng.standard_normal(n)
    if layout == "mono_f32":
        return mono.astype(np.float32)
    if layout == "stereo_f32":
        return np.stack([mono, 0.5 * mono], axis=1).astype(np.float32)
    if layout == "mono_i16":
        return np.clip(mono * 32767, -32768, 32767).astype(np.int16)
    if layout == "stereo_i16":
        return np.clip(np.stack([mono, -mono], axis=1) * 32767, -32768, 32767).astype(np.int16)
    return mono[:, None].astype(np.float64)


@st.composite
def client_cases(draw: st.DrawFn) -> Dict[str, Any]:
    preset = PRESETS[draw(st.sampled_from(sorted(PRESETS)))]
    rate = draw(st.sampled_from([16000, 16000, 8000, 11025, 22050, 44100, 48000]))
    steps = draw(st.integers(0, 3 if preset.step_samples < 100_000 else 1))
    edge = draw(st.one_of(st.sampled_from([0, 1, -1, 159, 160, 1280, -1280]),
                          st.integers(0, preset.step_samples)))
    n16 = max(0, steps * preset.step_samples + edge)
    # a length at the input rate near n16 (a few samples either way: not every n16 is reachable)
    n = max(0, int(round(n16 * rate / 16000)) + draw(st.integers(-2, 2)))
    cut_points = draw(st.lists(st.one_of(st.integers(0, max(n, 1)),
                                         st.sampled_from([1, FRAME_SAMPLES, preset.step_samples])),
                               max_size=14))
    bounds = [0] + sorted(min(c, n) for c in cut_points) + [n]  # repeated points give empty pieces
    params = draw(st.sampled_from([None, {"min_duration_on": 0.0, "onset": 0.3, "offset": 0.2},
                                   {"median_filter_frames": 3, "pad_offset": 0.1}]))
    return dict(preset=preset, rate=rate, n=n, bounds=bounds, params=params,
                layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2 ** 16)))


def assert_same_wire(got: Sequence[WireRequest], want: Sequence[WireRequest]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert (g.sequence_id, g.start, g.end, g.parameters) == (w.sequence_id, w.start, w.end, w.parameters), k
        assert np.array_equal(g.length, w.length), f"request {k}: AUDIO_LENGTH {g.length} != {w.length}"
        assert g.audio.tobytes() == w.audio.tobytes(), f"request {k}: AUDIO differs"


@examples(60)
@example(dict(preset=PRESETS["low"], rate=16000, n=3 * PRESETS["low"].step_samples,
              bounds=[0, 1, 1, PRESETS["low"].step_samples, 3 * PRESETS["low"].step_samples], params=None,
              layout="mono_f32", seed=1))
@given(client_cases())
def test_client_any_split_sends_the_requests_of_the_whole_recording(case: Dict[str, Any]) -> None:
    preset, rate, n, bounds = case["preset"], case["rate"], case["n"], case["bounds"]
    audio = make_audio(n, case["layout"], case["seed"])
    pieces = [audio[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    note(f"preset={preset.name} rate={rate} n={n} pieces={[len(p) for p in pieces]}")
    whole, whole_updates, whole_server = run_stream(preset, [audio], rate, case["params"])
    split, split_updates, split_server = run_stream(preset, pieces, rate, case["params"])
    # the wire: identical requests, which are iter_steps over the whole recording resampled at once
    assert_same_wire(split_server.requests, whole_server.requests)
    audio16 = resample_to_16k(to_mono_float32(audio), rate)
    assert audio16.size == resampled_length(n, rate)
    steps = list(iter_steps(preset, audio16))
    assert len(steps) == len(whole_server.requests) == requests_for(preset, audio16.size)
    for k, (step, req) in enumerate(zip(steps, whole_server.requests)):
        assert (step.start, step.end, step.valid) == (req.start, req.end, int(req.length[0, 0])), k
        assert step.audio.tobytes() == req.audio[0].tobytes(), f"request {k}: AUDIO differs from iter_steps"
    assert whole_server.requests[0].parameters == (check_parameters(case["params"]) or None)
    # the client's view: the same updates and the same result
    assert _same_updates(split_updates, whole_updates)
    assert (split.n_samples, split.requests, split.finished) == (whole.n_samples, whole.requests, whole.finished)
    assert split.probs.tobytes() == whole.probs.tobytes()
    assert split.segments == whole.segments
    assert whole.n_samples == audio16.size and whole.requests == len(steps)
    assert whole.n_frames == output_frames_for(audio16.size) or not whole.finished


# =====================================================================================================
# 3. the real local tritonserver (tiny random-init model)
# =====================================================================================================
SERVER_PRESETS = ("ultra_low", "low")
SERVER_SECONDS = 3.3
SERVER_PARAMS: Tuple[Optional[Dict[str, Any]], ...] = (
    None,
    {"onset": 0.3, "offset": 0.2, "min_duration_on": 0.0, "min_duration_off": 0.0},
    {"onset": 0.6, "offset": 0.4, "pad_onset": 0.1, "pad_offset": 0.2, "median_filter_frames": 3},
)


@pytest.fixture(scope="module")
def server_audio() -> np.ndarray:
    audio, _ = conversation(SERVER_SECONDS, n_speakers=3, seed=23)
    return audio


@pytest.fixture(scope="module")
def unsplit_runs(tiny_server, server_audio: np.ndarray) -> Dict[str, Result]:
    """Per preset, the recording fed whole (unary gRPC, default segment parameters)."""
    runs = {}
    for name in SERVER_PRESETS:
        with DiarizationClient(tiny_server.grpc_url, protocol="grpc", preset=name, timeout=60) as client:
            runs[name] = client.diarize(server_audio)
    return runs


@st.composite
def server_splits(draw: st.DrawFn, n: int) -> Dict[str, Any]:
    points = draw(st.lists(st.integers(0, n), max_size=10))
    protocol = draw(st.sampled_from(["grpc", "grpc-stream", "http"]))
    return dict(bounds=[0] + sorted(points) + [n], protocol=protocol,
                max_in_flight=draw(st.integers(1, 4)) if protocol == "grpc-stream" else 1,
                params=draw(st.sampled_from(SERVER_PARAMS)))


def reference_keys32(probs: np.ndarray, params: Optional[Dict[str, Any]]) -> List[Key]:
    return sorted(key32(s) for s in offline_segments(probs, SegmentParams(**(params or {}))))


@pytest.mark.parametrize("preset_name", SERVER_PRESETS)
def test_server_any_split_gives_the_unsplit_predictions_and_segments(
    preset_name: str, tiny_server, server_audio: np.ndarray, unsplit_runs: Dict[str, Result]
) -> None:
    unsplit = unsplit_runs[preset_name]
    preset = PRESETS[preset_name]
    n = server_audio.size
    assert unsplit.finished and unsplit.requests == requests_for(preset, n)
    assert unsplit.n_frames == output_frames_for(n)
    assert reference_keys32(unsplit.probs, None) == sorted(map(key32, unsplit.segments))
    assert unsplit.segments, "the recording should give the tiny model some segments to compare"
    for params in SERVER_PARAMS[1:]:
        assert reference_keys32(unsplit.probs, params) != reference_keys32(unsplit.probs, None), \
            f"choose segment parameters that change this recording's segments: {params}"

    @settings(BASE, max_examples=8 * SCALE,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(server_splits(n))
    def split_run(case: Dict[str, Any]) -> None:
        pieces = [server_audio[a:b] for a, b in zip(case["bounds"][:-1], case["bounds"][1:])]
        note(f"{case['protocol']} in_flight={case['max_in_flight']} pieces={[len(p) for p in pieces]}")
        url = tiny_server.http_url if case["protocol"] == "http" else tiny_server.grpc_url
        with DiarizationClient(url, protocol=case["protocol"], preset=preset_name, timeout=60,
                               max_in_flight=case["max_in_flight"]) as client:
            with client.open_stream(segment_params=case["params"]) as stream:
                for piece in pieces:
                    stream.feed(piece)
                result = stream.close()
        assert result.finished and result.requests == unsplit.requests
        assert result.probs.tobytes() == unsplit.probs.tobytes(), "confirmed predictions differ"
        if case["params"] is None:
            assert sorted(map(key32, result.segments)) == sorted(map(key32, unsplit.segments))
        assert sorted(map(key32, result.segments)) == reference_keys32(unsplit.probs, case["params"])
        assert len(set(map(key32, result.segments))) == len(result.segments)

    split_run()
