"""Named speakers: enrollment clips at a stream's start, slot names, and the visible timeline after them.

Sortformer's speaker slots are anonymous and arrival-ordered. A stream may begin with *enrollment clips*:
requests whose parameter ``enroll`` names the speaker of their audio (consecutive requests with the same
name are one clip; ``enroll_overwrite`` lets a clip rename a slot or move a name). The clip's audio runs
through the same graphs and state as any audio -- the speaker cache and FIFO learn the voice -- and then
the *visible* timeline restarts at frame 0: the meeting's first frame is frame 0 of every output, exactly
as if the meeting audio had followed the clips in one recording, shifted by the clips' frames.

The rule that names a slot (``decide_slot``): once every frame of a clip is confirmed (up to
ceil(right_context / chunk_len) requests after the clip's last one, so the decision may come with the
meeting's first responses), the slot with the most speech frames (probability > 0.5) in the clip took
it, if it has at least ``MIN_ENROLL_SPEECH_FRAMES`` of them and at least ``ENROLL_DOMINANCE`` times the
frames of any other slot. A clip no slot clearly took, a name already on another slot, or a slot already
named otherwise (without ``enroll_overwrite``) refuses the stream: its audio is in the speaker cache for
good, so every later request is refused until END (start the stream again).

Clip requests must carry full steps (the client library pads a clip with zeros to whole steps): a short
step ends a stream's audio. Names are also settable on START with the parameter ``speaker_names`` (a JSON
list of N_SPEAKERS names, "" for unnamed), e.g. for a stream that starts from a saved speaker profile.

Triton-free; the postprocessor model (``python_backend/postprocessor``) calls it for every request, and
``admission`` checks the names with :func:`parse_stream_names` / :func:`parse_enroll` before any state moves.
"""
from __future__ import annotations

import dataclasses
import json
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .presets import N_SPEAKERS
from .timeline import bool_parameter

ENROLL_PARAMETER = "enroll"
ENROLL_OVERWRITE_PARAMETER = "enroll_overwrite"
SPEAKER_NAMES_PARAMETER = "speaker_names"
MAX_NAME_CHARS = 64
MIN_ENROLL_SPEECH_FRAMES = 10  # 0.8 s of speech at 80 ms frames
ENROLL_DOMINANCE = 2.0
SPEECH_THRESHOLD = 0.5


class EnrollmentError(ValueError):
    """A clip or name the stream cannot take; the message says why."""


def check_name(name: object, what: str = "speaker name") -> str:
    """A speaker name: 1..64 characters, no whitespace or control characters (it is an RTTM field)."""
    if not isinstance(name, str) or not name:
        raise EnrollmentError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_CHARS:
        raise EnrollmentError(f"{what} {name[:16]!r}... is longer than {MAX_NAME_CHARS} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in name):
        raise EnrollmentError(f"{what} {name!r} holds whitespace or control characters (use e.g. '_')")
    return name


def check_names(names: Sequence[object]) -> List[str]:
    """N_SPEAKERS slot names ("" = unnamed), each valid, no name twice."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or len(names) != N_SPEAKERS:
        raise EnrollmentError(f"{SPEAKER_NAMES_PARAMETER} must be a list of {N_SPEAKERS} names (\"\" for an "
                              f"unnamed slot), got {names!r}")
    out = ["" if n == "" else check_name(n, f"name of slot {k}") for k, n in enumerate(names)]
    named = [n for n in out if n]
    if len(set(named)) != len(named):
        raise EnrollmentError(f"{SPEAKER_NAMES_PARAMETER} names a speaker twice: {out}")
    return out


def parse_stream_names(values: Mapping[str, object]) -> List[str]:
    """The slot names a START request's parameters (``timeline.parse_request_parameters``) set:
    ``speaker_names`` or none."""
    raw = values.get(SPEAKER_NAMES_PARAMETER)
    if raw is None:
        return [""] * N_SPEAKERS
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise EnrollmentError(f"{SPEAKER_NAMES_PARAMETER} must be a JSON list of names: {exc}") from None
    return check_names(raw)


def parse_enroll(values: Mapping[str, object]) -> Tuple[Optional[str], bool]:
    """(name, overwrite) of a request whose parameters say ``enroll``; (None, False) otherwise."""
    name = values.get(ENROLL_PARAMETER)
    overwrite = bool_parameter(values, ENROLL_OVERWRITE_PARAMETER)
    if name is None:
        return None, False
    return check_name(name, "enrollment name"), overwrite


def speech_frames(probs: np.ndarray) -> np.ndarray:
    """Per slot, the frames of ``probs`` ([frames, N_SPEAKERS]) with speech (probability > 0.5)."""
    return (np.asarray(probs) > SPEECH_THRESHOLD).sum(axis=0).astype(np.int64)


def decide_slot(counts: Sequence[int]) -> Tuple[Optional[int], str]:
    """The slot that clearly took a clip from its per-slot speech frames; (None, why) if none did."""
    counts = [int(c) for c in counts]
    order = sorted(range(len(counts)), key=lambda k: (-counts[k], k))
    best, runner = order[0], (counts[order[1]] if len(order) > 1 else 0)
    if counts[best] < MIN_ENROLL_SPEECH_FRAMES:
        return None, (f"only {counts[best]} frames of speech in any slot (at least {MIN_ENROLL_SPEECH_FRAMES} "
                      f"frames = {MIN_ENROLL_SPEECH_FRAMES * 0.08:g} s are needed)")
    if counts[best] < ENROLL_DOMINANCE * runner:
        return None, (f"no slot clearly took it: slot {best} has {counts[best]} speech frames, slot {order[1]} "
                      f"{runner} (the winner needs {ENROLL_DOMINANCE:g}x the runner-up; one voice per clip)")
    return best, ""


@dataclasses.dataclass
class _Clip:
    name: str
    overwrite: bool
    start: int  # stream frames [start, end)
    end: int
    counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(N_SPEAKERS, np.int64))
    slot: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Visible:
    """One response's frames after the enrollment frames are taken out (offsets in meeting frames)."""

    confirmed: np.ndarray
    tentative: np.ndarray
    frame_offset: int


@dataclasses.dataclass(frozen=True)
class Enrolled:
    name: str
    slot: int
    counts: Tuple[int, ...]


class SpeakerNames:
    """One stream's slot names and enrollment clips; maps stream frames to the visible (meeting) frames."""

    def __init__(self, chunk_len: int, names: Optional[Sequence[str]] = None) -> None:
        self.chunk_len = int(chunk_len)
        self.names: List[str] = check_names(names) if names is not None else [""] * N_SPEAKERS
        self.clips: List[_Clip] = []
        self.enrollment_frames = 0  # stream frames before the meeting's frame 0
        self.meeting_started = False
        self.refused: Optional[str] = None
        self._open: Optional[_Clip] = None  # the clip the last request extended

    # ---- requests in ------------------------------------------------------------------------------
    def request(self, enroll: Optional[str], overwrite: bool = False) -> None:
        """Account one request (before its outputs): a step of clip ``enroll``, or meeting audio."""
        if self.refused is not None:
            raise EnrollmentError(f"the stream was refused at enrollment ({self.refused}); end it (END) and "
                                  f"start it again")
        if enroll is None:
            self.meeting_started = True
            self._open = None
            return
        if self.meeting_started:  # its audio is in the state already: the stream cannot go on
            self.refused = f"enrollment clip {enroll!r} came after the meeting audio began"
            raise EnrollmentError(f"enrollment clip {enroll!r} after the meeting audio began: clips must come "
                                  f"first, before any request without '{ENROLL_PARAMETER}'; the stream is "
                                  f"refused until END")
        if self._open is not None and self._open.name == enroll and self._open.overwrite == overwrite:
            self._open.end += self.chunk_len
        else:
            self._open = _Clip(enroll, overwrite, self.enrollment_frames, self.enrollment_frames + self.chunk_len)
            self.clips.append(self._open)
        self.enrollment_frames += self.chunk_len

    # ---- outputs ----------------------------------------------------------------------------------
    def step(self, confirmed: np.ndarray, tentative: np.ndarray, frame_offset: int,
             finished: bool) -> Tuple[Visible, List[Enrolled]]:
        """A response's confirmed frames (stream frames from ``frame_offset``) in: the clips they complete
        are decided (EnrollmentError refuses the stream), and the visible part of the frames comes out."""
        try:
            return self._step(confirmed, tentative, int(frame_offset), finished)
        except EnrollmentError as exc:
            self.refused = str(exc)
            raise

    def _step(self, confirmed: np.ndarray, tentative: np.ndarray, offset: int,
              finished: bool) -> Tuple[Visible, List[Enrolled]]:
        done: List[Enrolled] = []
        end = offset + len(confirmed)
        for clip in self.clips:
            if clip.slot is not None:
                continue
            lo, hi = max(clip.start, offset), min(clip.end, end)
            if hi > lo:
                clip.counts += speech_frames(confirmed[lo - offset:hi - offset])
            if end >= clip.end:
                done.append(self._name(clip))
            elif finished:
                raise EnrollmentError(
                    f"the audio ended inside enrollment clip {clip.name!r} (frame {end} of {clip.end}): clip "
                    f"requests must carry full steps, and the meeting audio must follow them")
        b = self.enrollment_frames
        skip = min(max(b - offset, 0), len(confirmed))
        visible_conf = confirmed[skip:]
        t_skip = min(max(b - end, 0), len(tentative))  # tentative frames start at stream frame `end`
        visible_tent = tentative[t_skip:]
        return Visible(visible_conf, visible_tent, max(offset - b, 0)), done

    def _name(self, clip: _Clip) -> Enrolled:
        slot, why = decide_slot(clip.counts)
        if slot is None:
            raise EnrollmentError(f"enrollment clip {clip.name!r} refused: {why}")
        current = self.names[slot]
        if current and current != clip.name and not clip.overwrite:
            raise EnrollmentError(f"enrollment clip {clip.name!r} was taken by slot {slot}, which is already "
                                  f"named {current!r} (send {ENROLL_OVERWRITE_PARAMETER}=true to rename it; the "
                                  f"two voices may be too alike for the model)")
        other = [k for k, n in enumerate(self.names) if n == clip.name and k != slot]
        if other and not clip.overwrite:
            raise EnrollmentError(f"enrollment clip {clip.name!r} was taken by slot {slot}, but the name is on "
                                  f"slot {other[0]} (send {ENROLL_OVERWRITE_PARAMETER}=true to move it)")
        for k in other:
            self.names[k] = ""
        self.names[slot] = clip.name
        clip.slot = slot
        return Enrolled(clip.name, slot, tuple(int(c) for c in clip.counts))
