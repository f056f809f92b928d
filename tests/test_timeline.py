"""The postprocessor timeline: segment rule, streaming finalization, row packing (no Triton needed).

Invariants (hypothesis, arbitrary splits of a stream into steps, arbitrary tentative frames):
(a) after finalize, the finalized segments reported step by step == ``segments_from_probs`` of the
    whole confirmed array; (b) no finalized segment is reported twice (so none changes); (c) the
    tentative segments of a step == ``segments_from_probs(confirmed + tentative)`` minus the finalized
    ones; (d) frame_offset gaps raise; (e) the offline rule matches NeMo's ``vad_utils``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import List, Sequence, Set, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sortformer_triton.contract import segment_rows
from sortformer_triton.presets import FRAME_SECONDS, N_SPEAKERS
from sortformer_triton.segments_codec import (
    SegmentOverflowError,
    SegmentPacker,
    StreamPostprocessor,
    pack_segments,
    unpack_segments,
    valid_rows,
)
from sortformer_triton.timeline import (
    PARAMETER_NAMES,
    Segment,
    SegmentParams,
    StepResult,
    Timeline,
    TimelineError,
    parse_segment_params,
    segments_from_probs,
)

Key = Tuple[float, float, int]
FS = FRAME_SECONDS


def key(seg: Segment) -> Key:
    return (seg.start, seg.end, seg.speaker)


def keys(segments: Sequence[Segment]) -> List[Key]:
    return sorted(key(s) for s in segments)


def track(*runs: Tuple[float, int]) -> np.ndarray:
    """A one-speaker [T, 1] track from (probability, frames) runs."""
    return np.concatenate([np.full(n, v, np.float32) for v, n in runs])[:, None]


def spans(segments: Sequence[Segment]) -> List[Tuple[float, float]]:
    return [(round(s.start, 6), round(s.end, 6)) for s in segments]


# ---- parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"onset": 0.4, "offset": 0.6}, "must not exceed onset"),
        ({"onset": 1.5}, r"in \[0, 1\]"),
        ({"offset": -0.1}, r"in \[0, 1\]"),
        ({"pad_onset": -0.01}, "in \\[0, 10\\]"),
        ({"pad_offset": -1.0}, "in \\[0, 10\\]"),
        ({"pad_offset": 1e300}, "in \\[0, 10\\]"),  # issue 12: Infinity segment ends
        ({"min_duration_on": -0.25}, "in \\[0, 60\\]"),
        ({"min_duration_off": 61.0}, "in \\[0, 60\\]"),
        ({"median_filter_frames": 1000001}, "odd integer in 1..63"),  # issue 12: 8.8 GB, slow streams
        ({"min_duration_off": float("inf")}, "finite"),
        ({"median_filter_frames": 4}, "odd integer"),
        ({"median_filter_frames": 0}, "odd integer"),
        ({"median_filter_frames": 3.0}, "must be an integer"),
        ({"median_filter_frames": True}, "must be an integer"),
        ({"onset": "0.5"}, "must be a number"),
        ({"onset": float("nan")}, "finite"),
        ({"frame_seconds": 0.0}, "frame_seconds"),
    ],
)
def test_params_refuse_nonsense(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentParams(**changes)


def test_params_defaults_match_the_design() -> None:
    p = SegmentParams()
    assert (p.onset, p.offset, p.min_duration_on, p.min_duration_off) == (0.5, 0.5, 0.25, 0.1)
    assert (p.pad_onset, p.pad_offset, p.median_filter_frames, p.frame_seconds) == (0.0, 0.0, 1, FS)


def test_parse_segment_params_from_strings_numbers_and_unknown_keys() -> None:
    params = parse_segment_params({
        "onset": "0.7", "offset": 0.3, "median_filter_frames": "5", "min_duration_on": 1,
        "state_ttl_seconds": "60", "something_for_another_step": "x",
    })
    assert params == SegmentParams(onset=0.7, offset=0.3, median_filter_frames=5, min_duration_on=1.0)
    base = SegmentParams(onset=0.8)
    assert parse_segment_params({"pad_onset": "0.1"}, base) == dataclasses.replace(base, pad_onset=0.1)
    assert parse_segment_params({"median_filter_frames": 3.0}).median_filter_frames == 3
    assert set(PARAMETER_NAMES) == {f.name for f in dataclasses.fields(SegmentParams)} - {"frame_seconds"}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"onset": "high"}, "onset must be a number"),
        ({"median_filter_frames": "3.5"}, "median_filter_frames must be an integer"),
        ({"median_filter_frames": "2"}, "odd integer"),
        ({"offset": "0.9"}, "must not exceed onset"),
        ({"min_duration_off": None}, "min_duration_off must be a number"),
    ],
)
def test_parse_segment_params_errors_name_the_parameter(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_segment_params(values)


# ---- the offline rule on hand-checked examples -----------------------------------------------------
def test_hysteresis_starts_above_onset_and_ends_below_offset() -> None:
    probs = track((0.0, 2), (0.7, 3), (0.45, 2), (0.2, 3), (0.65, 2), (0.0, 1))
    params = SegmentParams(onset=0.6, offset=0.4, min_duration_on=0.0, min_duration_off=0.0)
    # starts at frame 2 (0.7 > 0.6), 0.45 is not below 0.4, ends at frame 7; 0.65 at frames 10-11
    assert spans(segments_from_probs(probs, params)) == [(2 * FS, 7 * FS), (10 * FS, 12 * FS)]


def test_values_equal_to_the_thresholds_do_not_switch() -> None:
    probs = track((0.5, 3), (0.9, 2), (0.5, 2), (0.1, 1))
    params = SegmentParams(min_duration_on=0.0, min_duration_off=0.0)
    assert spans(segments_from_probs(probs, params)) == [(3 * FS, 7 * FS)]


def test_open_segment_closes_at_the_end_of_the_last_frame() -> None:
    probs = track((0.0, 1), (0.9, 4))
    assert spans(segments_from_probs(probs, SegmentParams(min_duration_on=0.0))) == [(FS, 5 * FS)]


def test_padding_clips_at_zero_and_merges_touching_segments() -> None:
    probs = track((0.9, 2), (0.0, 2), (0.9, 2), (0.0, 4))
    params = SegmentParams(pad_onset=0.08, pad_offset=0.08, min_duration_on=0.0, min_duration_off=0.0)
    # [0, .16+.08] and [.32-.08, .48+.08] touch at .24 -> one segment
    assert spans(segments_from_probs(probs, params)) == [(0.0, round(6 * FS + 0.08, 6))]


def test_short_segments_are_removed_before_short_gaps_are_filled() -> None:
    """NeMo's filter_speech_first: a 1-frame blip is dropped first, so it cannot bridge two gaps."""
    probs = track((0.9, 5), (0.0, 1), (0.9, 1), (0.0, 1), (0.9, 5), (0.0, 2))
    params = SegmentParams(min_duration_on=0.1, min_duration_off=0.1)
    # after removing the blip the gap is 3 frames (0.24 s) >= 0.1: two segments stay separate
    assert spans(segments_from_probs(probs, params)) == [(0.0, 5 * FS), (8 * FS, 13 * FS)]
    fill = SegmentParams(min_duration_on=0.1, min_duration_off=0.3)
    assert spans(segments_from_probs(probs, fill)) == [(0.0, 13 * FS)]


def test_median_filter_removes_single_frame_dropouts_and_replicates_edges() -> None:
    probs = track((0.9, 4), (0.0, 1), (0.9, 4), (0.0, 3))
    params = SegmentParams(min_duration_on=0.0, min_duration_off=0.0, median_filter_frames=3)
    assert spans(segments_from_probs(probs, params)) == [(0.0, 9 * FS)]
    # the last frame's window [p8, p9, p9 replicated] keeps a trailing 2-frame run
    assert spans(segments_from_probs(track((0.0, 5), (0.9, 2)), params)) == [(5 * FS, 7 * FS)]


def test_frame_offset_shifts_times_and_speakers_are_independent() -> None:
    probs = np.zeros((10, N_SPEAKERS), np.float32)
    probs[2:6, 1] = 0.9
    probs[4:10, 3] = 0.8
    got = segments_from_probs(probs, SegmentParams(), frame_offset=100)
    assert [(round(s.start, 6), round(s.end, 6), s.speaker, s.finalized) for s in got] == [
        (round(102 * FS, 6), round(106 * FS, 6), 1, True),
        (round(104 * FS, 6), round(110 * FS, 6), 3, True),
    ]
    assert segments_from_probs(np.zeros((0, N_SPEAKERS), np.float32)) == []


# ---- a literal transliteration of NeMo's vad_utils (runs where NeMo is not installed) --------------
def reference_segments(probs: np.ndarray, params: SegmentParams) -> List[Tuple[float, float]]:
    """NeMo's binarization + filtering (filter_speech_first) in plain Python, one speaker.

    Differences, both intended: the median filter (NeMo has none) and the open segment closing at the
    end of the last frame (NeMo: at its start), emulated here by appending one silent frame.
    """
    h = params.half_window
    p = np.asarray(probs, np.float32).reshape(-1)
    if h and len(p):
        padded = np.pad(p, h, mode="edge")
        p = np.array([np.median(padded[i: i + 2 * h + 1]) for i in range(len(p))], np.float32)
    seq = list(p) + [np.float32(0.0)]
    fl, on, off = params.frame_seconds, np.float32(params.onset), np.float32(params.offset)
    segs: List[List[float]] = []
    speech, start, i = False, 0.0, 0
    for i, value in enumerate(seq):
        if speech:
            if value < off:
                segs.append([max(0.0, start - params.pad_onset), i * fl + params.pad_offset])
                start, speech = i * fl, False
        elif value > on:
            start, speech = i * fl, True
    if speech:
        segs.append([max(0.0, start - params.pad_onset), i * fl + params.pad_offset])
    segs = merge_touching(segs)
    if params.min_duration_on > 0:
        segs = [s for s in segs if s[1] - s[0] >= params.min_duration_on]
    if params.min_duration_off > 0 and segs:
        gaps = [[a[1], b[0]] for a, b in zip(segs, segs[1:]) if b[0] - a[1] < params.min_duration_off]
        segs = merge_touching(segs + gaps)
    return [(s[0], s[1]) for s in segs]


def merge_touching(segs: List[List[float]]) -> List[List[float]]:
    out: List[List[float]] = []
    for s in sorted(segs):
        if out and out[-1][1] >= s[0]:
            out[-1][1] = max(out[-1][1], s[1])
        else:
            out.append(list(s))
    return out


# ---- hypothesis strategies ------------------------------------------------------------------------
PROB_VALUES = [0.0, 0.1, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9, 1.0]


@st.composite
def prob_arrays(draw: st.DrawFn, max_frames: int = 70, n_speakers: int = N_SPEAKERS) -> np.ndarray:
    """Runs of a few probability levels per speaker (segments, blips, threshold ties)."""
    n = draw(st.integers(0, max_frames))
    columns = []
    for _ in range(n_speakers):
        column: List[float] = []
        while len(column) < n:
            column += [draw(st.sampled_from(PROB_VALUES))] * draw(st.integers(1, 9))
        columns.append(column[:n])
    return np.array(columns, np.float32).T.reshape(n, n_speakers)


@st.composite
def segment_params(draw: st.DrawFn) -> SegmentParams:
    onset = draw(st.sampled_from([0.5, 0.6, 0.8]))
    return SegmentParams(
        onset=onset,
        offset=draw(st.sampled_from([v for v in (0.2, 0.4, 0.5) if v <= onset])),
        pad_onset=draw(st.sampled_from([0.0, 0.05, 0.16, 0.3])),
        pad_offset=draw(st.sampled_from([0.0, 0.08, 0.2])),
        min_duration_on=draw(st.sampled_from([0.0, 0.1, 0.25, 0.5])),
        min_duration_off=draw(st.sampled_from([0.0, 0.1, 0.24, 0.6])),
        median_filter_frames=draw(st.sampled_from([1, 3, 5])),
    )


@st.composite
def streams(draw: st.DrawFn) -> Tuple[np.ndarray, List[int], List[np.ndarray]]:
    """Confirmed frames, an arbitrary split into steps (0-frame steps too), tentative frames per step."""
    probs = draw(prob_arrays())
    sizes: List[int] = []
    while sum(sizes) < len(probs):
        sizes.append(min(draw(st.integers(0, 12)), len(probs) - sum(sizes)))
    sizes.append(draw(st.integers(0, 0)))
    tentative = [draw(prob_arrays(max_frames=6)) for _ in sizes]
    return probs, sizes, tentative


FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- invariants -----------------------------------------------------------------------------------
@FAST
@given(probs=prob_arrays(), params=segment_params())
def test_offline_rule_matches_the_reference(probs: np.ndarray, params: SegmentParams) -> None:
    got = segments_from_probs(probs, params)
    for speaker in range(probs.shape[1]):
        mine = [(s.start, s.end) for s in got if s.speaker == speaker]
        assert mine == reference_segments(probs[:, speaker], params)


@FAST
@given(stream=streams(), params=segment_params())
def test_streaming_equals_offline_for_any_split(
    stream: Tuple[np.ndarray, List[int], List[np.ndarray]], params: SegmentParams
) -> None:
    probs, sizes, tentatives = stream
    timeline = Timeline(params)
    reported: List[Segment] = []
    offset = 0
    for size, tent in zip(sizes, tentatives):
        confirmed = probs[offset: offset + size]
        result = timeline.update(confirmed, tent, offset)
        offset += size
        assert all(s.finalized for s in result.finalized)
        assert all(not s.finalized for s in result.tentative)
        reported += result.finalized
        # (b) never twice; each finalized segment stays what any continuation gives: here, the
        # tentative frames followed by the end of the stream
        assert len(set(map(key, reported))) == len(reported)
        seen = probs[:offset]
        with_tentative = segments_from_probs(np.concatenate([seen, tent]), params)
        assert set(map(key, reported)) <= set(map(key, with_tentative))
        # (c) tentative = offline(confirmed + tentative) minus what is final
        done: Set[Key] = set(map(key, reported))
        assert keys(result.tentative) == sorted(k for k in map(key, with_tentative) if k not in done)
    reported += timeline.finalize().finalized
    # (a) everything, exactly once
    assert sorted(map(key, reported)) == keys(segments_from_probs(probs, params))
    assert len(set(map(key, reported))) == len(reported)
    assert keys(timeline.finalized_segments) == sorted(map(key, reported))
    np.testing.assert_array_equal(timeline.confirmed_probs, probs)
    assert timeline.finalize() == StepResult([], [])


@FAST
@given(stream=streams(), params=segment_params())
def test_finished_flag_on_the_last_step_finalizes_like_finalize(
    stream: Tuple[np.ndarray, List[int], List[np.ndarray]], params: SegmentParams
) -> None:
    probs, sizes, _ = stream
    timeline = Timeline(params, keep_history=False)
    reported: List[Segment] = []
    empty = np.zeros((0, N_SPEAKERS), np.float32)
    offset = 0
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        reported += timeline.update(probs[offset: offset + size], empty, offset, finished=last).finalized
        offset += size
    assert timeline.finished
    assert sorted(map(key, reported)) == keys(segments_from_probs(probs, params))
    # an empty flush step after FINISHED is accepted; frames are not
    assert timeline.update(empty, empty, offset) == StepResult([], [])
    with pytest.raises(TimelineError, match="already finished"):
        timeline.update(np.zeros((1, N_SPEAKERS), np.float32), empty, offset)


# ---- (d) and other refusals -----------------------------------------------------------------------
def test_frame_offset_must_continue_the_stream() -> None:
    timeline = Timeline()
    frames = np.full((3, N_SPEAKERS), 0.9, np.float32)
    empty = frames[:0]
    timeline.update(frames, empty, 0)
    with pytest.raises(TimelineError, match="must start at frame 3"):
        timeline.update(frames, empty, 4)  # gap
    with pytest.raises(TimelineError, match="must start at frame 3"):
        timeline.update(frames, empty, 0)  # repeat
    timeline.update(empty, frames, 3)  # a waiting step: nothing confirmed, offset unchanged
    assert timeline.n_confirmed == 3
    with pytest.raises(TimelineError, match="must start at frame 3"):
        timeline.update(empty, empty, 2)


def test_refused_steps_leave_the_timeline_unchanged() -> None:
    timeline = Timeline(keep_history=True)
    frames = np.full((3, N_SPEAKERS), 0.9, np.float32)
    with pytest.raises(TimelineError, match="speaker columns"):
        timeline.update(np.zeros((3, 2), np.float32), frames[:0], 0)
    with pytest.raises(TimelineError, match=r"\[frames, speakers\]"):
        timeline.update(np.zeros(4, np.float32), frames[:0], 0)
    with pytest.raises(TimelineError, match="NaN"):
        timeline.update(np.full((2, N_SPEAKERS), np.nan, np.float32), frames[:0], 0)
    with pytest.raises(TimelineError, match="no tentative frames"):
        timeline.update(frames, frames, 0, finished=True)
    assert timeline.n_confirmed == 0 and not timeline.finished
    assert timeline.confirmed_probs.shape == (0, N_SPEAKERS)


def test_history_is_optional() -> None:
    timeline = Timeline(keep_history=False)
    with pytest.raises(RuntimeError, match="keep_history"):
        _ = timeline.confirmed_probs
    with pytest.raises(RuntimeError, match="keep_history"):
        _ = timeline.finalized_segments


# ---- finalization latency and cost ------------------------------------------------------------------
def test_a_segment_finalizes_as_soon_as_nothing_can_reach_it() -> None:
    params = SegmentParams(min_duration_on=0.0, min_duration_off=0.1)
    timeline = Timeline(params, n_speakers=1)
    probs = track((0.9, 5), (0.0, 10))
    empty = probs[:0]
    # frames 0-5 confirmed: the segment closed at frame 5, but one starting at frame 6 (0.48 s) would
    # leave a 0.08 s gap < 0.1 s
    assert timeline.update(probs[:6], empty, 0).finalized == []
    # frame 6 is silent too: the earliest new start is frame 7 (gap 0.16 s) -> final
    got = timeline.update(probs[6:7], empty, 6).finalized
    assert spans(got) == [(0.0, 5 * FS)]


def test_median_half_window_and_padding_delay_finalization() -> None:
    params = SegmentParams(min_duration_on=0.0, min_duration_off=0.0, median_filter_frames=5,
                           pad_onset=0.16)
    timeline = Timeline(params, n_speakers=1)
    probs = track((0.9, 5), (0.0, 20))
    empty = probs[:0]
    results = [timeline.update(probs[i: i + 1], empty, i).finalized for i in range(len(probs))]
    first_final = next(i for i, r in enumerate(results) if r)
    # the filtered track closes the segment at frame 5 (0.4 s), settled once frame 5 + 2 is confirmed.
    # A new segment starting at frame f pads back to f * 0.08 - 0.16 and merges while that is <= 0.4,
    # i.e. for f <= 7: final once frame 7 is settled silent, i.e. once frame 7 + 2 = 9 is confirmed
    assert first_final == 9
    assert spans(results[first_final]) == [(0.0, 5 * FS)]


def test_long_streams_keep_only_the_tail_and_steps_stay_cheap() -> None:
    params = SegmentParams(median_filter_frames=5, pad_onset=0.1, pad_offset=0.1)
    rng = np.random.default_rng(0)
    step = 6
    n_steps = 3000
    # 2 s turns of random speakers with noise: many segments over 40 minutes of stream
    turns = np.repeat(rng.integers(0, N_SPEAKERS, size=n_steps * step // 25 + 1), 25)[: n_steps * step]
    probs = rng.uniform(0.0, 0.3, size=(n_steps * step, N_SPEAKERS)).astype(np.float32)
    probs[np.arange(len(turns)), turns] = rng.uniform(0.6, 1.0, size=len(turns))
    timeline = Timeline(params, keep_history=False)
    tentative = probs[:7]
    reported: List[Segment] = []
    durations = []
    for i in range(n_steps):
        t0 = time.perf_counter()
        reported += timeline.update(probs[i * step: (i + 1) * step], tentative, i * step).finalized
        durations.append(time.perf_counter() - t0)
        assert timeline.retained_frames <= params.half_window * 2 + step
        assert timeline.pending_raw_segments <= 8
    reported += timeline.finalize().finalized
    assert sorted(map(key, reported)) == keys(segments_from_probs(probs, params))
    # fastest steps of an early and a late window: robust to a busy machine, sensitive to O(stream)
    early, late = min(durations[100:400]), min(durations[-300:])
    assert late < 3 * early + 1e-4, f"step cost grew with the stream: {early:.2e} s -> {late:.2e} s"


# ---- (e) NeMo itself -------------------------------------------------------------------------------
NEMO_PADS = (0.0, 0.02, 0.07, 0.13)
# Durations and gaps here are multiples of 0.01 s; thresholds at x.xx5 avoid exact ties, where
# NeMo's float32 and our float64 arithmetic could round differently.
NEMO_MIN_ON = (0.0, 0.085, 0.245, 0.405)
NEMO_MIN_OFF = (0.0, 0.105, 0.175, 0.335)


def nemo_cases(n: int) -> List[Tuple[np.ndarray, SegmentParams]]:
    rng = np.random.default_rng(1234)
    cases = []
    for i in range(n):
        frames = int(rng.integers(1, 200))
        # runs of random levels: real segments plus flicker around the thresholds
        levels = rng.uniform(0.0, 1.0, size=frames // 3 + 1).astype(np.float32)
        probs = np.repeat(levels, rng.integers(1, 8, size=len(levels)))[:frames]
        onset = float(rng.uniform(0.3, 0.8))
        params = SegmentParams(
            onset=onset, offset=float(rng.uniform(0.1, onset)),
            pad_onset=float(rng.choice(NEMO_PADS)), pad_offset=float(rng.choice(NEMO_PADS)),
            min_duration_on=float(rng.choice(NEMO_MIN_ON)), min_duration_off=float(rng.choice(NEMO_MIN_OFF)),
        ) if i % 4 else SegmentParams()
        cases.append((probs, params))
    return cases


def same_spans(a: Sequence[Tuple[float, float]], b: Sequence[Tuple[float, float]], tol: float) -> bool:
    return len(a) == len(b) and bool(np.allclose(np.reshape(a, -1), np.reshape(b, -1), rtol=0, atol=tol))


def test_offline_rule_matches_nemo_vad_utils() -> None:
    pytest.importorskip("nemo")
    torch = pytest.importorskip("torch")
    from nemo.collections.asr.parts.utils import vad_utils

    for probs, params in nemo_cases(150):
        per_args = {
            "onset": params.onset, "offset": params.offset,
            "pad_onset": params.pad_onset, "pad_offset": params.pad_offset,
            "min_duration_on": params.min_duration_on, "min_duration_off": params.min_duration_off,
            "filter_speech_first": 1.0,
        }
        # ours closes an open segment at the end of the last frame: NeMo on the track + one silent frame
        extended = torch.tensor(np.append(probs, np.float32(0.0)))
        # in 80 ms units ...
        nemo = vad_utils.filtering(
            vad_utils.binarization(extended, {**per_args, "frame_length_in_sec": FS}), per_args)
        # ... and as NeMo's Sortformer diarization calls it: 10 ms units, each frame repeated 8 times
        in_10ms = torch.repeat_interleave(extended, 8)
        diar = vad_utils.filtering(
            vad_utils.binarization(in_10ms, {**per_args, "frame_length_in_sec": 0.01}), per_args)
        mine = [(s.start, s.end) for s in segments_from_probs(probs[:, None], params)]
        for theirs in (nemo, diar):
            expected = sorted(tuple(row) for row in theirs.reshape(-1, 2).tolist())
            assert same_spans(mine, expected, tol=1e-5), (mine, expected, probs.tolist(), params)


# ---- rows: SEGMENTS / N_SEGMENTS -------------------------------------------------------------------
def seg(start: float, speaker: int = 0, finalized: bool = True) -> Segment:
    return Segment(start, start + 0.5, speaker, finalized)


def test_pack_unpack_round_trip() -> None:
    segments = [seg(0.0, 1), seg(1.28, 3, False), seg(3600.08, 0)]
    max_rows = segment_rows(6)
    rows, n = pack_segments(segments, max_rows)
    assert rows.shape == (max_rows, 4) and rows.dtype == np.float32 and n == 3
    assert not rows[n:].any()
    back = unpack_segments(rows[None], np.array([[n]], np.int32))
    assert [(b.speaker, b.finalized) for b in back] == [(1, True), (3, False), (0, True)]
    assert [b.start for b in back] == pytest.approx([s.start for s in segments], abs=1e-3)
    with pytest.raises(ValueError, match="outside"):
        unpack_segments(rows, max_rows + 1)
    with pytest.raises(SegmentOverflowError):
        pack_segments([seg(float(i)) for i in range(max_rows + 1)], max_rows)


def test_packer_puts_finalized_first_and_truncates_tentative() -> None:
    packer = SegmentPacker(max_rows=4)
    rows, n = packer.pack(StepResult([seg(0.0), seg(1.0)], [seg(2.0, finalized=False)] * 5))
    got = unpack_segments(rows, n)
    assert n == 4 and [s.finalized for s in got] == [True, True, False, False]


def test_packer_carries_overflowing_finalized_segments_to_the_next_response() -> None:
    packer = SegmentPacker(max_rows=3)
    finals = [seg(float(i)) for i in range(7)]
    tentative = [seg(9.0, finalized=False)]
    first = unpack_segments(*packer.pack(StepResult(finals, tentative)))
    assert [s.start for s in first] == [0.0, 1.0, 2.0] and packer.pending == 4
    second = unpack_segments(*packer.pack(StepResult([seg(7.0)], tentative)))
    assert [s.start for s in second] == [3.0, 4.0, 5.0] and packer.pending == 2
    last = unpack_segments(*packer.pack(StepResult([], tentative), last=True))
    assert [(s.start, s.finalized) for s in last] == [(6.0, True), (7.0, True), (9.0, False)]
    assert packer.pending == 0


def test_packer_refuses_at_end_only_when_the_rows_cannot_hold_the_finals() -> None:
    packer = SegmentPacker(max_rows=3)
    rows, n = packer.pack(StepResult([seg(0.0), seg(1.0), seg(2.0)], [seg(5.0, finalized=False)]), last=True)
    assert n == 3 and all(s.finalized for s in unpack_segments(rows, n))
    with pytest.raises(SegmentOverflowError, match="last response"):
        SegmentPacker(max_rows=3).pack(StepResult([seg(float(i)) for i in range(4)], []), last=True)


@settings(max_examples=60, deadline=None)
@given(stream=streams(), params=segment_params(), max_rows=st.integers(1, 4))
def test_stream_rows_deliver_every_finalized_segment_once_in_order(
    stream: Tuple[np.ndarray, List[int], List[np.ndarray]], params: SegmentParams, max_rows: int
) -> None:
    """The model's path: padded tensors + counts in, rows out; finals survive any row budget."""
    probs, sizes, tentatives = stream
    post = StreamPostprocessor(params, max_rows=max_rows)
    chunk, right = 12, 6
    delivered: List[Segment] = []
    offset = 0
    for size, tent in zip(sizes, tentatives):
        conf_rows = np.zeros((chunk, N_SPEAKERS), np.float32)
        conf_rows[:size] = probs[offset: offset + size]
        tent_rows = np.zeros((right, N_SPEAKERS), np.float32)
        tent_rows[: len(tent)] = tent
        rows, n = post.step(conf_rows[None], np.array([[size]], np.int32), tent_rows[None],
                            np.array([[len(tent)]], np.int32), offset, finished=False, end=False).segments
        offset += size
        delivered += [s for s in unpack_segments(rows, n) if s.finalized]
    expected = segments_from_probs(probs, params)
    empty = np.zeros((chunk, N_SPEAKERS), np.float32)
    while post.packer.pending:  # flush steps carry the finals that did not fit
        rows, n = post.step(empty, 0, empty, 0, offset, finished=False, end=False).segments
        delivered += [s for s in unpack_segments(rows, n) if s.finalized]
    if len(expected) - len(delivered) > max_rows:
        with pytest.raises(SegmentOverflowError, match="last response"):
            post.step(empty, 0, empty, 0, offset, finished=False, end=True)
        return
    rows, n = post.step(empty, 0, empty, 0, offset, finished=False, end=True).segments
    delivered += unpack_segments(rows, n)
    assert all(s.finalized for s in delivered)
    assert len(set(map(row_key, delivered))) == len(delivered)
    assert sorted(map(row_key, delivered)) == sorted(map(row_key, expected))


def row_key(s: Segment) -> Tuple[int, float, float]:
    """A segment as SEGMENTS carries it (float32 seconds)."""
    return (s.speaker, float(np.float32(s.start)), float(np.float32(s.end)))


def test_valid_rows_checks_counts() -> None:
    rows = np.ones((1, 6, N_SPEAKERS), np.float32)
    assert valid_rows(rows, np.array([[2]], np.int32), "CONFIRMED").shape == (2, N_SPEAKERS)
    with pytest.raises(TimelineError, match="N_CONFIRMED 7 is outside 0..6"):
        valid_rows(rows, 7, "CONFIRMED")
    with pytest.raises(TimelineError, match="one integer"):
        valid_rows(rows, np.array([1, 2]), "CONFIRMED")


def test_stream_postprocessor_finalizes_at_end_without_finished() -> None:
    post = StreamPostprocessor(SegmentParams(), segment_rows(6))
    probs = np.zeros((6, N_SPEAKERS), np.float32)
    probs[1:, 2] = 0.9  # still speaking when the client stops
    rows, n = post.step(probs, 6, probs[:0], 0, 0, finished=False, end=False).segments
    assert [s.finalized for s in unpack_segments(rows, n)] == [False]
    rows, n = post.step(probs[:0], 0, probs[:0], 0, 6, finished=False, end=True).segments
    got = unpack_segments(rows, n)
    assert [(s.speaker, s.finalized) for s in got] == [(2, True)]
    assert got[0].start == pytest.approx(FS) and got[0].end == pytest.approx(6 * FS)
