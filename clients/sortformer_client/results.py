"""What a stream returns: one ``Update`` per request, one ``Result`` per finished stream."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sortformer_triton.presets import FRAME_SECONDS, N_SPEAKERS, SAMPLE_RATE
from sortformer_triton.profiles import SpeakerProfile
from sortformer_triton.timeline import Segment


@dataclasses.dataclass(frozen=True)
class Update:
    """What one request of a stream made known (the decoded outputs of one response).

    ``confirmed`` frames never change; they are frames ``frame_offset .. frame_offset + n_confirmed`` of
    the stream. ``tentative`` are the next frames' current guesses (replaced by the next update).
    ``finalized_segments`` became final in this step and are reported exactly once per stream;
    ``tentative_segments`` are the current view of everything not final yet (replaced every step).
    """

    index: int  # request index within the stream, 0-based
    frame_offset: int
    confirmed: np.ndarray  # [n_confirmed, 4] float32
    tentative: np.ndarray  # [n_tentative, 4] float32
    finalized_segments: Tuple[Segment, ...]
    tentative_segments: Tuple[Segment, ...]
    finished: bool  # every frame of the stream is confirmed
    end: bool  # this was the stream's last request (END)
    latency_s: float  # request sent -> response received
    speaker_names: Tuple[str, ...] = ("",) * N_SPEAKERS  # the slots' names after this response ("" = unnamed)

    @property
    def n_confirmed(self) -> int:
        return int(self.confirmed.shape[0])

    @property
    def n_tentative(self) -> int:
        return int(self.tentative.shape[0])

    @property
    def tentative_offset(self) -> int:
        """Stream frame index of ``tentative[0]``."""
        return self.frame_offset + self.n_confirmed


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished stream: every confirmed frame and every finalized segment."""

    sequence_id: int
    preset: str
    n_samples: int  # 16 kHz samples streamed
    probs: np.ndarray  # [frames, 4] float32: per-frame speaker activity probabilities
    segments: Tuple[Segment, ...]  # all finalized segments, in reporting order
    requests: int
    finished: bool
    frame_seconds: float = FRAME_SECONDS
    tail_updates: Tuple[Update, ...] = ()  # the updates of the requests ``close`` sent
    speaker_names: Tuple[str, ...] = ("",) * N_SPEAKERS  # the slots' names ("" = unnamed: speaker_<k>)
    profile: Optional[SpeakerProfile] = None  # the speaker state the stream saved last (close(save_profile=True))

    def label(self, speaker: int) -> str:
        """The RTTM / JSON label of a slot: its name, or ``speaker_<k>``."""
        return speaker_label(speaker, self.speaker_names)

    @property
    def duration_s(self) -> float:
        return self.n_samples / SAMPLE_RATE

    @property
    def n_frames(self) -> int:
        return int(self.probs.shape[0])

    @property
    def speakers(self) -> List[int]:
        """Speaker slots with at least one segment, ascending."""
        return sorted({s.speaker for s in self.segments})

    def segments_of(self, speaker: int) -> List[Segment]:
        return sorted((s for s in self.segments if s.speaker == speaker), key=lambda s: (s.start, s.end))

    def to_dict(self, uri: Optional[str] = None, include_probs: bool = True,
                extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """JSON-ready: segments (seconds, speaker index and label) and per-frame probabilities."""
        out: Dict[str, Any] = {}
        if uri is not None:
            out["uri"] = uri
        out.update({
            "preset": self.preset,
            "sequence_id": self.sequence_id,
            "duration_s": round(self.duration_s, 6),
            "sample_rate": SAMPLE_RATE,
            "frame_seconds": self.frame_seconds,
            "n_frames": self.n_frames,
            "n_speakers": N_SPEAKERS,
            "finished": self.finished,
            "requests": self.requests,
            "speaker_names": list(self.speaker_names),
            "segments": [segment_dict(s, self.speaker_names) for s in sorted(self.segments, key=_time_order)],
        })
        if include_probs:
            out["probabilities"] = [[round(float(v), 6) for v in row] for row in self.probs]
        if extra:
            out.update(extra)
        return out


def speaker_label(speaker: int, names: Optional[Sequence[str]] = None) -> str:
    """RTTM / JSON label of a speaker slot: its name when ``names`` has one, else ``speaker_<k>``."""
    k = int(speaker)
    if names is not None and 0 <= k < len(names) and names[k]:
        return str(names[k])
    return f"speaker_{k}"


def segment_dict(segment: Segment, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return {
        "start": round(float(segment.start), 6),
        "end": round(float(segment.end), 6),
        "duration": round(float(segment.end - segment.start), 6),
        "speaker": int(segment.speaker),
        "label": speaker_label(segment.speaker, names),
    }


def _time_order(segment: Segment) -> Tuple[float, float, int]:
    return (segment.start, segment.end, segment.speaker)

