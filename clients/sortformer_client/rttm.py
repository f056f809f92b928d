"""RTTM and JSON files of diarization results.

RTTM (NIST Rich Transcription Time Marked), one line per speaker turn, ten space-separated fields::

    SPEAKER <uri> 1 <start s> <duration s> <NA> <NA> <speaker label> <NA> <NA>

Times are written with millisecond precision. ``uri`` must not contain whitespace (it is replaced by
``_``). Speaker labels are the slot's name (``sortformer_triton.speakers``: no whitespace) or
``speaker_<k>`` for the model's unnamed speaker slot ``k``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Union

from sortformer_triton.timeline import Segment

from .results import Result, speaker_label

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class Turn:
    """One RTTM SPEAKER line: a speaker's turn in a recording."""

    uri: str
    start: float
    duration: float
    speaker: str
    channel: str = "1"

    @property
    def end(self) -> float:
        return self.start + self.duration


def safe_uri(name: str) -> str:
    """A recording id usable as an RTTM field (no whitespace, never empty)."""
    cleaned = re.sub(r"\s+", "_", name.strip())
    return cleaned or "recording"


def rttm_lines(uri: str, segments: Iterable[Segment], names: Optional[Sequence[str]] = None) -> List[str]:
    """RTTM SPEAKER lines of ``segments`` (sorted by start, then speaker), labelled with ``names``."""
    uri = safe_uri(uri)
    lines = []
    for seg in sorted(segments, key=lambda s: (s.start, s.speaker, s.end)):
        duration = max(0.0, float(seg.end) - float(seg.start))
        lines.append(
            f"SPEAKER {uri} 1 {float(seg.start):.3f} {duration:.3f} <NA> <NA> "
            f"{speaker_label(seg.speaker, names)} <NA> <NA>"
        )
    return lines


def write_rttm(path: PathLike, uri: str, segments: Iterable[Segment],
               names: Optional[Sequence[str]] = None) -> None:
    lines = rttm_lines(uri, segments, names)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))


def parse_rttm(text: str, source: str = "<rttm>") -> List[Turn]:
    """SPEAKER lines of an RTTM text (other line types and ``;;`` comments are skipped)."""
    turns: List[Turn] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(";;") or line.startswith("#"):
            continue
        fields = line.split()
        if fields[0] != "SPEAKER":
            continue
        if len(fields) < 8:
            raise ValueError(f"{source}:{number}: a SPEAKER line needs at least 8 fields, got {len(fields)}")
        try:
            start, duration = float(fields[3]), float(fields[4])
        except ValueError:
            raise ValueError(f"{source}:{number}: start/duration must be numbers: {line!r}") from None
        if start < 0 or duration < 0:
            raise ValueError(f"{source}:{number}: negative start or duration: {line!r}")
        turns.append(Turn(uri=fields[1], start=start, duration=duration, speaker=fields[7], channel=fields[2]))
    return turns


def read_rttm(path: PathLike) -> List[Turn]:
    with open(path, encoding="utf-8") as fh:
        return parse_rttm(fh.read(), os.fspath(path))


def turns_by_uri(turns: Iterable[Turn]) -> Dict[str, List[Turn]]:
    out: Dict[str, List[Turn]] = {}
    for turn in turns:
        out.setdefault(turn.uri, []).append(turn)
    return out


def write_json(path: PathLike, result: Result, uri: str, include_probs: bool = True,
               extra: Optional[Dict[str, object]] = None) -> None:
    """The result as JSON: metadata, segments and (by default) per-frame probabilities."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result.to_dict(uri=safe_uri(uri), include_probs=include_probs, extra=extra), fh)
        fh.write("\n")

