"""Segments <-> the fixed-shape SEGMENTS / N_SEGMENTS outputs, and one stream's postprocessing.

SEGMENTS is ``[contract.segment_rows(chunk_len), 4]`` float32 rows ``(start s, end s, speaker, finalized 1/0)``
with N_SEGMENTS valid rows (Triton outputs have fixed shapes). Times are float32 seconds from the
stream's start (resolution < 4 ms for streams under 9 hours; frames are 80 ms).

Row budget per response (``SegmentPacker``):

* finalized segments first, in reporting order. They are reported once per stream, so they must never
  be dropped. ``contract.segment_rows`` sizes the rows so that every segment one response can finalize
  fits; with fewer rows (tests) the rows are filled and the rest stays *pending*, to be sent first in the
  sequence's next response;
* tentative segments after them, as many as fit (earliest first). They are a view recomputed every
  step, so truncating them loses nothing for good;
* the last response of a sequence (END) has no next response: if the pending and new finalized
  segments do not fit, ``SegmentOverflowError`` says so (the rows cannot carry them).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .speakers import SpeakerNames
from .timeline import SegmentParams, Segment, StepResult, Timeline, TimelineError

ROW_FIELDS: Tuple[str, ...] = ("start", "end", "speaker", "finalized")


class SegmentOverflowError(ValueError):
    """More finalized segments are due in a sequence's last response than SEGMENTS has rows."""


def pack_segments(segments: Sequence[Segment], max_rows: int) -> Tuple[np.ndarray, int]:
    """Rows ``[max_rows, 4]`` float32 (zeros after the valid ones) and the number of valid rows."""
    if len(segments) > max_rows:
        raise SegmentOverflowError(f"{len(segments)} segments do not fit in {max_rows} rows")
    rows = np.zeros((max_rows, len(ROW_FIELDS)), np.float32)
    for i, seg in enumerate(segments):
        rows[i] = (seg.start, seg.end, seg.speaker, 1.0 if seg.finalized else 0.0)
    return rows, len(segments)


def unpack_segments(rows: np.ndarray, n_segments: int) -> List[Segment]:
    """The first ``n_segments`` rows of SEGMENTS (a leading batch dim of 1 is accepted)."""
    arr = np.asarray(rows)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] != len(ROW_FIELDS):
        raise ValueError(f"SEGMENTS must be [rows, {len(ROW_FIELDS)}], got shape {list(arr.shape)}")
    n = int(np.asarray(n_segments).reshape(-1)[0])
    if not 0 <= n <= arr.shape[0]:
        raise ValueError(f"N_SEGMENTS {n} is outside 0..{arr.shape[0]}")
    return [
        Segment(float(start), float(end), int(round(float(speaker))), bool(flag >= 0.5))
        for start, end, speaker, flag in arr[:n]
    ]


class SegmentPacker:
    """One sequence's row budget: finalized first (overflow carried over), tentative truncated."""

    def __init__(self, max_rows: int) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        self._max_rows = max_rows
        self._pending: List[Segment] = []

    @property
    def pending(self) -> int:
        """Finalized segments waiting for a later response."""
        return len(self._pending)

    def pack(self, result: StepResult, last: bool = False) -> Tuple[np.ndarray, int]:
        """Rows for one response; ``last`` when no response of this sequence follows (END)."""
        due = self._pending + list(result.finalized)
        if last and len(due) > self._max_rows:
            raise SegmentOverflowError(
                f"{len(due)} finalized segments are due in the sequence's last response but SEGMENTS "
                f"has {self._max_rows} rows (contract.segment_rows sizes them for every response)"
            )
        sent, self._pending = due[: self._max_rows], due[self._max_rows:]
        room = self._max_rows - len(sent)
        return pack_segments(sent + list(result.tentative[:room]), self._max_rows)


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one request of a stream answers: SEGMENTS rows and the visible frames (meeting frames)."""

    rows: np.ndarray
    n_rows: int
    confirmed: np.ndarray  # the valid visible rows, [n, speakers]
    tentative: np.ndarray
    frame_offset: int
    names: Tuple[str, ...]

    @property
    def segments(self) -> Tuple[np.ndarray, int]:
        """(SEGMENTS rows, N_SEGMENTS)."""
        return self.rows, self.n_rows


class StreamPostprocessor:
    """One stream in the postprocessor model: step tensors in, SEGMENTS rows out (Triton-free).

    ``speakers`` keeps the slot names and the enrollment clips (``sortformer_triton.speakers``): their
    frames never reach the timeline, and every frame index after them is a meeting frame.
    """

    def __init__(self, params: Optional[SegmentParams], max_rows: int, chunk_len: int = 1,
                 names: Optional[Sequence[str]] = None) -> None:
        self.timeline = Timeline(params, keep_history=False)
        self.packer = SegmentPacker(max_rows)
        self.speakers = SpeakerNames(chunk_len, names)

    @property
    def params(self) -> SegmentParams:
        return self.timeline.params

    def step(
        self,
        confirmed: np.ndarray,
        n_confirmed: int,
        tentative: np.ndarray,
        n_tentative: int,
        frame_offset: int,
        finished: bool,
        end: bool,
        enroll: Optional[str] = None,
        overwrite: bool = False,
    ) -> StepOutput:
        """One request: the valid rows of CONFIRMED / TENTATIVE into the timeline; SEGMENTS rows.

        ``enroll`` names the speaker of this request's audio (an enrollment clip's step). At END
        everything is finalized even when the stream did not report FINISHED (a client that stops early
        still gets its segments).
        """
        self.speakers.request(enroll, overwrite)
        conf = valid_rows(confirmed, n_confirmed, "CONFIRMED")
        tent = valid_rows(tentative, n_tentative, "TENTATIVE")
        visible, _ = self.speakers.step(conf, tent, frame_offset, finished)
        result = self.timeline.update(visible.confirmed, visible.tentative, visible.frame_offset, finished)
        if end:
            result = result.then(self.timeline.finalize())
        rows, n_rows = self.packer.pack(result, last=end)
        return StepOutput(rows, n_rows, visible.confirmed, visible.tentative, visible.frame_offset,
                          tuple(self.speakers.names))


def pad_rows(rows: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``rows`` ([n, speakers]) at the top of a zero tensor shaped and typed like ``like`` (a leading
    batch dim of 1 kept)."""
    out = np.zeros_like(like)
    view = out[0] if out.ndim == 3 else out
    view[: len(rows)] = rows
    return out


def valid_rows(rows: np.ndarray, count: int, name: str) -> np.ndarray:
    """The first ``count`` rows of a fixed-size ``[rows, speakers]`` tensor (batch dim of 1 accepted)."""
    arr = np.asarray(rows)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise TimelineError(f"{name} must be [rows, speakers], got shape {list(arr.shape)}")
    counts = np.asarray(count).reshape(-1)
    if counts.size != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise TimelineError(f"N_{name} must be one integer, got {count!r}")
    n = int(counts[0])
    if not 0 <= n <= arr.shape[0]:
        raise TimelineError(f"N_{name} {n} is outside 0..{arr.shape[0]} (the rows of {name})")
    return arr[:n]
