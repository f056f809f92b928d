"""Speaker segments from Sortformer frame probabilities: offline, and incrementally per stream.

This is the postprocessor's logic (DESIGN.md "Postprocessor semantics", like FluidAudio's
SortformerTimeline), numpy only, so it is tested without Triton and reused by clients.

Segment rule (per speaker; NeMo ``vad_utils.binarization`` + ``filtering`` with its default
``filter_speech_first``, the path NeMo's Sortformer diarization uses):

1. optional median filter over ``median_filter_frames`` frames (odd; 1 = off). At the edges of the
   stream the window is filled with the first / last frame (edge replication), so a stream's start
   and end are treated alike;
2. hysteresis: a segment starts at the first frame with ``p > onset`` and ends at the first later
   frame with ``p < offset``; frame ``i`` spans ``[i, i+1) * frame_seconds``, so a segment started at
   frame ``s`` and ended by frame ``e`` is ``[s, e) * frame_seconds``. A segment still open when the
   stream ends closes at the end of the last frame. (NeMo closes it at the *start* of its last frame;
   that is NeMo's edge quirk, not a rule: ours equals NeMo's on the stream followed by one silent
   frame, which is how the tests compare);
3. padding: ``[max(0, start - pad_onset), end + pad_offset]``, then segments that overlap or touch
   (``end >= next start``) merge;
4. segments shorter than ``min_duration_on`` are removed (kept when ``duration >= min_duration_on``);
5. then gaps shorter than ``min_duration_off`` between the remaining segments are filled (merged).

Thresholds are compared in float32 (the model's output type, as NeMo compares float32 tensors);
times and durations are float64 (NeMo uses float32 there: results can differ only for durations
within float32 rounding of a threshold).

Streaming (``Timeline``): confirmed frames never change; a segment is *finalized* once no future frame
can change it. With the median filter's half window ``h``, filtered values are exact up to frame
``N - h`` (``N`` confirmed frames); hysteresis over them yields closed raw segments and the start of
an open one. Every raw segment still to come then starts at frame ``f`` or later (``f`` = the open
segment's start, else ``N - h``), i.e. at time ``B = max(0, f * frame_seconds - pad_onset)`` or later
after padding. So, exactly:

* the last padded group of closed raw segments may still merge with future ones iff its end >= B;
  every earlier group is fixed, and so is its min_duration_on verdict;
* the last chain of fixed kept segments (joined by gaps < min_duration_off) may still be joined to a
  future segment iff ``P - chain end < min_duration_off``, where ``P`` is the earliest start of
  anything not fixed (the still-mergeable group's start, else ``B``); every earlier chain is final.

That is tighter than "end + pad_offset + min_duration_off + h frames before the last confirmed frame"
and never finalizes a segment a future frame could change (tests check it against the offline result
for arbitrary splits into steps and arbitrary continuations). Only the unfinalized tail is kept:
``h`` frames of probabilities for the filter, the hysteresis state, and the closed raw segments of
not-yet-final segments, so a step costs O(step + unfinalized tail), not O(stream).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .contract import MAX_MEDIAN_FILTER_FRAMES, MAX_MIN_DURATION_SECONDS, MAX_PAD_SECONDS
from .presets import FRAME_SECONDS, N_SPEAKERS

# A raw segment: [start frame, end frame) in absolute frame indices of the stream.
RawSegment = Tuple[int, int]


class TimelineError(ValueError):
    """A step that does not fit the stream so far (frame gap, wrong shape, frames after the end)."""


@dataclasses.dataclass(frozen=True)
class SegmentParams:
    """Binarization and filtering parameters (durations in seconds), validated on construction."""

    onset: float = 0.5
    offset: float = 0.5
    pad_onset: float = 0.0
    pad_offset: float = 0.0
    min_duration_on: float = 0.25
    min_duration_off: float = 0.1
    median_filter_frames: int = 1
    frame_seconds: float = FRAME_SECONDS

    def __post_init__(self) -> None:
        for name in ("onset", "offset"):
            value = _real(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability threshold in [0, 1], got {value!r}")
        if self.offset > self.onset:
            raise ValueError(
                f"offset ({self.offset}) must not exceed onset ({self.onset}): hysteresis starts a "
                "segment above onset and ends it below offset"
            )
        for name, limit in (("pad_onset", MAX_PAD_SECONDS), ("pad_offset", MAX_PAD_SECONDS),
                            ("min_duration_on", MAX_MIN_DURATION_SECONDS),
                            ("min_duration_off", MAX_MIN_DURATION_SECONDS)):
            value = _real(name, getattr(self, name))
            if not 0.0 <= value <= limit:
                raise ValueError(f"{name} is a duration in seconds in [0, {limit:g}], got {value!r}")
        window = self.median_filter_frames
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
            raise ValueError(f"median_filter_frames must be an integer, got {window!r}")
        if not 1 <= window <= MAX_MEDIAN_FILTER_FRAMES or window % 2 == 0:
            raise ValueError(f"median_filter_frames must be an odd integer in 1..{MAX_MEDIAN_FILTER_FRAMES} "
                             f"(1 = off; {MAX_MEDIAN_FILTER_FRAMES} frames = 5 s), got {window}")
        if _real("frame_seconds", self.frame_seconds) <= 0.0:
            raise ValueError(f"frame_seconds must be > 0, got {self.frame_seconds!r}")

    @property
    def half_window(self) -> int:
        """Frames the median filter looks ahead (and back): how long filtered values stay unsettled."""
        return int(self.median_filter_frames) // 2


# Parameters a model config or a request may set (frame_seconds is the model's, not the user's).
PARAMETER_NAMES: Tuple[str, ...] = (
    "onset", "offset", "pad_onset", "pad_offset", "min_duration_on", "min_duration_off",
    "median_filter_frames",
)


def parse_segment_params(values: Mapping[str, object], base: Optional[SegmentParams] = None) -> SegmentParams:
    """``base`` with the entries of ``values`` named in PARAMETER_NAMES applied; others are ignored.

    Values may be numbers or strings (Triton config parameters are strings; request parameters are
    JSON). Other keys are ignored because Triton hands the same ``parameters`` to every model (config
    keys such as ``state_ttl_seconds``; ensemble request parameters meant for other steps).
    """
    changes: Dict[str, object] = {}
    for name in PARAMETER_NAMES:
        if name not in values:
            continue
        raw = values[name]
        changes[name] = _parse_int(name, raw) if name == "median_filter_frames" else _parse_float(name, raw)
    return dataclasses.replace(base or SegmentParams(), **changes)


def parse_request_parameters(text: str) -> Dict[str, object]:
    """A request's Triton ``parameters``, the JSON ``text`` a Python model's ``request.parameters()``
    returns, as a dict (parse it once per request: segment parameters, names, enrollment, profile flags
    all read from it); ValueError says what is wrong."""
    values = json.loads(text) if text else {}
    if not isinstance(values, dict):
        raise ValueError(f"request parameters must be a JSON object, got {text!r}")
    return values


def bool_parameter(values: Mapping[str, object], name: str) -> bool:
    """A request parameter that is a bool (or "true"/"false"/"1"/"0", as some clients send); False if absent."""
    value = values.get(name, False)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        value = value.lower() in ("true", "1")
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Segment:
    """One speaker's segment in seconds from the stream's start; ``finalized`` once it cannot change."""

    start: float
    end: float
    speaker: int
    finalized: bool


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Segments that became final in this step (reported once per stream), and the current guesses."""

    finalized: List[Segment]
    tentative: List[Segment]

    def then(self, later: "StepResult") -> "StepResult":
        """This step followed by ``later`` in the same response: both finals, the later guesses."""
        return StepResult(self.finalized + later.finalized, later.tentative)


def segments_from_probs(
    probs: np.ndarray, params: Optional[SegmentParams] = None, frame_offset: int = 0
) -> List[Segment]:
    """The offline reference: segments of a complete ``[T, speakers]`` array (all finalized).

    ``frame_offset`` is the stream frame index of ``probs[0]`` (times are from the stream's start); the
    array's ends are the stream's ends for the median filter and for closing open segments.
    """
    params = params or SegmentParams()
    p = _check_probs(probs, None, "probs")
    total = len(p)
    filtered = _median(p, 0, 0, total, total, params.half_window)
    out: List[Segment] = []
    for speaker in range(p.shape[1]):
        raw, speaking, start = _hysteresis(filtered[:, speaker], frame_offset, params, False, 0)
        if speaking:
            raw.append((start, frame_offset + total))
        final, _ = _resolve(raw, params, None)
        out.extend(Segment(s, e, speaker, True) for s, e in final)
    return sorted(out, key=segment_order)


def segment_order(segment: Segment) -> Tuple[float, float, int]:
    """Reporting order: by start, then end, then speaker."""
    return (segment.start, segment.end, segment.speaker)


@dataclasses.dataclass
class _Track:
    """One speaker's hysteresis state over the settled frames, and its not-yet-final raw segments."""

    speaking: bool = False
    start: int = 0  # start frame of the open raw segment (when speaking)
    raw: List[RawSegment] = dataclasses.field(default_factory=list)


class Timeline:
    """One stream's timeline: confirmed frames in, finalized and tentative segments out.

    ``keep_history`` keeps every confirmed frame and finalized segment for ``confirmed_probs`` and
    ``finalized_segments`` (O(stream) memory); the server turns it off and keeps only the tail.
    """

    def __init__(
        self,
        params: Optional[SegmentParams] = None,
        n_speakers: int = N_SPEAKERS,
        keep_history: bool = True,
    ) -> None:
        if isinstance(n_speakers, bool) or not isinstance(n_speakers, int) or n_speakers < 1:
            raise ValueError(f"n_speakers must be an integer >= 1, got {n_speakers!r}")
        self._params = params or SegmentParams()
        self._n_speakers = n_speakers
        self._n_confirmed = 0
        self._n_settled = 0  # frames whose filtered value is exact and went through hysteresis
        self._buf = np.zeros((0, n_speakers), np.float32)  # confirmed frames from _buf_start on
        self._buf_start = 0
        self._tracks = [_Track() for _ in range(n_speakers)]
        self._finished = False
        self._history: Optional[List[np.ndarray]] = [] if keep_history else None
        self._finalized: Optional[List[Segment]] = [] if keep_history else None

    # ---- properties -------------------------------------------------------------------------------
    @property
    def params(self) -> SegmentParams:
        return self._params

    @property
    def n_speakers(self) -> int:
        return self._n_speakers

    @property
    def n_confirmed(self) -> int:
        """Frames confirmed so far: the FRAME_OFFSET the next step must carry."""
        return self._n_confirmed

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def confirmed_probs(self) -> np.ndarray:
        """Every confirmed frame so far, ``[n_confirmed, speakers]`` (needs ``keep_history``)."""
        if self._history is None:
            raise RuntimeError("this Timeline was made with keep_history=False: it keeps only the tail")
        if not self._history:
            return np.zeros((0, self._n_speakers), np.float32)
        if len(self._history) > 1:
            self._history = [np.concatenate(self._history)]
        return self._history[0].copy()

    @property
    def finalized_segments(self) -> List[Segment]:
        """Every segment finalized so far, in reporting order (needs ``keep_history``)."""
        if self._finalized is None:
            raise RuntimeError("this Timeline was made with keep_history=False: it keeps only the tail")
        return list(self._finalized)

    @property
    def retained_frames(self) -> int:
        """Confirmed frames held for the median filter (bounded by the half window + one step)."""
        return len(self._buf)

    @property
    def pending_raw_segments(self) -> int:
        """Closed raw segments held because the segment they belong to is not final yet."""
        return sum(len(t.raw) for t in self._tracks)

    # ---- steps ------------------------------------------------------------------------------------
    def update(
        self, confirmed: np.ndarray, tentative: np.ndarray, frame_offset: int, finished: bool = False
    ) -> StepResult:
        """Append confirmed frames, replace the tentative ones; what became final, and the guesses.

        ``frame_offset`` must equal ``n_confirmed`` (no gaps, no repeats). With ``finished`` every
        frame is confirmed (``tentative`` must be empty) and everything is finalized. After the stream
        finished only empty steps are accepted (e.g. a last flush request before END).
        """
        conf = _check_probs(confirmed, self._n_speakers, "confirmed")
        tent = _check_probs(tentative, self._n_speakers, "tentative")
        offset = _parse_int("frame_offset", frame_offset)
        if offset != self._n_confirmed:
            raise TimelineError(
                f"frame_offset {offset} does not continue the stream: {self._n_confirmed} frames are "
                f"confirmed, so the next step must start at frame {self._n_confirmed}"
            )
        if self._finished:
            if len(conf) or len(tent):
                raise TimelineError(
                    f"the stream already finished at frame {self._n_confirmed}; got {len(conf)} "
                    f"confirmed and {len(tent)} tentative frames more"
                )
            return StepResult([], [])
        if finished and len(tent):
            raise TimelineError(f"a finished stream has no tentative frames, got {len(tent)}")
        self._append(conf)
        if finished:
            return self.finalize()
        self._settle(max(self._n_settled, self._n_confirmed - self._params.half_window))
        final = self._collect(at_end=False)
        return StepResult(final, self._tentative(tent))

    def finalize(self) -> StepResult:
        """Finalize everything (END / FINISHED); idempotent: a second call returns nothing."""
        if self._finished:
            return StepResult([], [])
        self._settle(self._n_confirmed)
        for track in self._tracks:
            if track.speaking:
                track.raw.append((track.start, self._n_confirmed))
                track.speaking = False
        final = self._collect(at_end=True)
        self._finished = True
        self._buf = self._buf[:0]
        self._buf_start = self._n_confirmed
        return StepResult(final, [])

    # ---- internals --------------------------------------------------------------------------------
    def _append(self, conf: np.ndarray) -> None:
        if not len(conf):
            return
        self._buf = np.concatenate([self._buf, conf]) if len(self._buf) else conf.copy()
        self._n_confirmed += len(conf)
        if self._history is not None:
            self._history.append(conf.copy())

    def _settle(self, stop: int) -> None:
        """Run hysteresis over the filtered frames [settled, stop), then drop frames the filter no
        longer needs. The right edge is replicated at ``n_confirmed`` (only reached when finishing)."""
        filtered = _median(self._buf, self._buf_start, self._n_settled, stop, self._n_confirmed,
                           self._params.half_window)
        for speaker, track in enumerate(self._tracks):
            closed, track.speaking, track.start = _hysteresis(
                filtered[:, speaker], self._n_settled, self._params, track.speaking, track.start)
            track.raw.extend(closed)
        self._n_settled = stop
        keep_from = max(0, stop - self._params.half_window)
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start:]
            self._buf_start = keep_from

    def _collect(self, at_end: bool) -> List[Segment]:
        """Segments that are final now, taken off the tracks (each is reported once)."""
        out: List[Segment] = []
        for speaker, track in enumerate(self._tracks):
            frontier = None if at_end else self._frontier(track)
            final, consumed = _resolve(track.raw, self._params, frontier)
            del track.raw[:consumed]
            out.extend(Segment(s, e, speaker, True) for s, e in final)
        out.sort(key=segment_order)
        if self._finalized is not None:
            self._finalized.extend(out)
        return out

    def _frontier(self, track: _Track) -> float:
        """Earliest padded start any raw segment not closed yet can have."""
        first = track.start if track.speaking else self._n_settled
        return _pad_start(first, self._params)

    def _tentative(self, tent: np.ndarray) -> List[Segment]:
        """Segments over confirmed + tentative frames (treated as the stream's end), minus the final."""
        total = self._n_confirmed + len(tent)
        frames = np.concatenate([self._buf, tent]) if len(tent) else self._buf
        filtered = _median(frames, self._buf_start, self._n_settled, total, total, self._params.half_window)
        out: List[Segment] = []
        for speaker, track in enumerate(self._tracks):
            tail, speaking, start = _hysteresis(
                filtered[:, speaker], self._n_settled, self._params, track.speaking, track.start)
            if speaking:
                tail.append((start, total))
            segments, _ = _resolve(track.raw + tail, self._params, None)
            out.extend(Segment(s, e, speaker, False) for s, e in segments)
        return sorted(out, key=segment_order)


# ---- the segment rule ------------------------------------------------------------------------------
class _Group(NamedTuple):
    """Padded raw segments merged because they overlap or touch; ``n_raw`` of them, in order."""

    start: float
    end: float
    n_raw: int


def _pad_start(frame: int, params: SegmentParams) -> float:
    return max(0.0, frame * params.frame_seconds - params.pad_onset)


def _pad_end(frame: int, params: SegmentParams) -> float:
    return frame * params.frame_seconds + params.pad_offset


def _padded_groups(raw: Sequence[RawSegment], params: SegmentParams) -> List[_Group]:
    """Step 3 of the rule: pad, merge what overlaps or touches (raw is in time order)."""
    groups: List[_Group] = []
    for s, e in raw:
        start, end = _pad_start(s, params), _pad_end(e, params)
        if groups and groups[-1].end >= start:
            last = groups[-1]
            groups[-1] = _Group(last.start, max(last.end, end), last.n_raw + 1)
        else:
            groups.append(_Group(start, end, 1))
    return groups


def _resolve(
    raw: Sequence[RawSegment], params: SegmentParams, frontier: Optional[float]
) -> Tuple[List[Tuple[float, float]], int]:
    """Steps 3-5 of the rule on closed raw segments; the final segments and how many raw ones to drop.

    ``frontier`` is the earliest padded start of raw segments still to come (None: none will come).
    Returns the segments no future raw segment can change, and the number of leading raw segments that
    nothing later depends on (those of the returned segments and removed short groups before the
    first unfinished chain).
    """
    groups = _padded_groups(raw, params)
    fixed = groups
    limit = frontier
    if frontier is not None and groups and groups[-1].end >= frontier:
        fixed, limit = groups[:-1], groups[-1].start  # the last group may still grow
    final: List[Tuple[float, float]] = []
    chain: Optional[List[float]] = None  # [start, end] of the current chain of kept groups
    chain_first_raw = 0
    raw_seen = 0
    for group in fixed:
        first_raw, raw_seen = raw_seen, raw_seen + group.n_raw
        if params.min_duration_on > 0.0 and group.end - group.start < params.min_duration_on:
            continue  # step 4: too short
        short_gap = chain is not None and group.start - chain[1] < params.min_duration_off
        if chain is not None and params.min_duration_off > 0.0 and short_gap:
            chain[1] = max(chain[1], group.end)  # step 5: fill the short gap
            continue
        if chain is not None:
            final.append((chain[0], chain[1]))
        chain, chain_first_raw = [group.start, group.end], first_raw
    consumed = raw_seen
    if chain is not None:
        if limit is None or limit - chain[1] >= params.min_duration_off:
            final.append((chain[0], chain[1]))
        else:
            consumed = chain_first_raw  # a future segment may still be joined to this chain
    return final, consumed


def _median(
    frames: np.ndarray, frames_start: int, first: int, stop: int, total: int, half: int
) -> np.ndarray:
    """Median-filtered frames [first, stop) of a stream of ``total`` frames, edges replicated.

    ``frames`` holds stream frames from ``frames_start`` on (at least ``first - half`` .. ``stop + half``
    clipped to the stream). The median of an odd window is one of its values, so it stays exact.
    """
    if stop <= first:
        return np.zeros((0, frames.shape[1]), np.float32)
    if half == 0:
        return frames[first - frames_start: stop - frames_start]
    taps = np.arange(first, stop)[:, None] + np.arange(-half, half + 1)[None, :]
    window = frames[np.clip(taps, 0, total - 1) - frames_start]  # [n, 2h+1, speakers]
    return np.partition(window, half, axis=1)[:, half, :]


def _hysteresis(
    probs: np.ndarray, first: int, params: SegmentParams, speaking: bool, start: int
) -> Tuple[List[RawSegment], bool, int]:
    """Onset/offset hysteresis over one speaker's frames [first, first + len); vectorized.

    After each frame the state is that of the last frame above onset (speaking) or below offset
    (silent) -- the two are exclusive since offset <= onset -- or the incoming state when neither has
    occurred yet. Returns the raw segments closed here, and the state (speaking, open start) after.
    """
    n = len(probs)
    if n == 0:
        return [], speaking, start
    above = probs > np.float32(params.onset)
    below = probs < np.float32(params.offset)
    last_event = np.maximum.accumulate(np.where(above | below, np.arange(n), -1))
    state = np.where(last_event >= 0, above[np.maximum(last_event, 0)], speaking)
    before = np.concatenate(([speaking], state[:-1]))
    begins = ([start] if speaking else []) + (np.flatnonzero(state & ~before) + first).tolist()
    ends = (np.flatnonzero(before & ~state) + first).tolist()
    closed = list(zip(begins, ends))
    if len(begins) > len(ends):
        return closed, True, begins[-1]
    return closed, False, start


# ---- input checks ----------------------------------------------------------------------------------
def _check_probs(probs: np.ndarray, n_speakers: Optional[int], name: str) -> np.ndarray:
    """A ``[frames, speakers]`` float32 array of finite values, or a clear TimelineError."""
    arr = np.asarray(probs)
    if arr.ndim != 2:
        raise TimelineError(f"{name} must be [frames, speakers], got shape {list(arr.shape)}")
    if n_speakers is not None and arr.shape[1] != n_speakers:
        raise TimelineError(f"{name} must have {n_speakers} speaker columns, got shape {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TimelineError(f"{name} must hold probabilities (numbers), got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise TimelineError(f"{name} holds NaN or infinite probabilities")
    return arr


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _parse_float(name: str, value: object) -> float:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    return _real(name, value)


def _parse_int(name: str, value: object) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, np.ndarray) and value.size == 1 and np.issubdtype(value.dtype, np.integer):
        return int(value.reshape(-1)[0])
    raise ValueError(f"{name} must be an integer, got {value!r}")
