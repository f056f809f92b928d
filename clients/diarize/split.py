"""``diarize split``: one audio file per speaker from an RTTM, with NeMo Curator's SpeakerSeparation semantics.

NeMo Curator's ``SpeakerSeparationStage`` (nemo_curator/stages/audio/segmentation/speaker_separation.py
and speaker_separation_module/speaker_sep.py) turns diarization segments into per-speaker audio:

1. overlaps: with ``exclude_overlaps`` (Curator's default True) every stretch where two or more speakers
   talk is dropped, and ``buffer_time`` (0.5 s) is cut off the single-speaker stretch next to each
   overlap (its end before an overlap starts, its start after an overlap ends); without it, overlapping
   segments are cut at the overlap points ("clean cut": a speaker who starts talking takes over);
2. per speaker, segments whose gap is ``<= gap_threshold`` (0.1 s) are merged;
3. segments shorter than ``min_duration`` (0.8 s) are dropped (kept when ``duration >= min_duration``);
4. each remaining speaker gets a file as long as the input: its segments' audio, silence elsewhere;
   speakers with under 0.1 s in all, digital silence only, or under ``min_duration`` in all get none.

Defaults are Curator's stage defaults (exclude_overlaps=True, min_duration=0.8, gap_threshold=0.1,
buffer_time=0.5). Segment times are cut at sample precision (Curator's pydub cuts at milliseconds).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from clients.sortformer_client.rttm import Turn, safe_uri

Span = Tuple[float, float]

DEFAULT_EXCLUDE_OVERLAPS = True
DEFAULT_MIN_DURATION = 0.8
DEFAULT_GAP_THRESHOLD = 0.1
DEFAULT_BUFFER_TIME = 0.5
MIN_TOTAL_SECONDS = 0.1  # Curator skips speakers with less speech than this in all
SILENCE_RMS = 1.0 / 32768.0  # Curator skips speakers whose audio is digital silence (pydub rms < 1)


@dataclasses.dataclass(frozen=True)
class SplitParams:
    exclude_overlaps: bool = DEFAULT_EXCLUDE_OVERLAPS
    min_duration: float = DEFAULT_MIN_DURATION
    gap_threshold: float = DEFAULT_GAP_THRESHOLD
    buffer_time: float = DEFAULT_BUFFER_TIME

    def __post_init__(self) -> None:
        for name in ("min_duration", "gap_threshold", "buffer_time"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")


def _events(speaker_segments: Mapping[str, Sequence[Span]]) -> List[Tuple[float, int, str]]:
    """(time, +1 start / -1 end, speaker), in time order, ends before starts at equal times."""
    events = [(float(t), kind, spk) for spk, spans in speaker_segments.items()
              for s, e in spans for t, kind in ((s, 1), (e, -1))]
    events.sort(key=lambda ev: (ev[0], ev[1]))
    return events


def exclude_overlaps(speaker_segments: Mapping[str, Sequence[Span]], buffer_time: float) -> Dict[str, List[Span]]:
    """Single-speaker stretches only; ``buffer_time`` trimmed next to every overlap."""
    out: Dict[str, List[Span]] = {spk: [] for spk in speaker_segments}
    active: set = set()
    solo_start: Optional[float] = None
    solo_speaker: Optional[str] = None
    for time, kind, speaker in _events(speaker_segments):
        if kind == 1:
            active.add(speaker)
            if len(active) == 1:
                solo_start, solo_speaker = time, speaker
            elif len(active) == 2 and solo_start is not None:
                # an overlap begins: the solo stretch ends buffer_time before it
                if solo_speaker is not None and solo_start < time:
                    end = max(solo_start, time - buffer_time)
                    if solo_start < end:
                        out[solo_speaker].append((solo_start, end))
                solo_start, solo_speaker = None, None
        else:
            if len(active) == 1 and speaker in active:
                if solo_start is not None and solo_start < time:
                    out[speaker].append((solo_start, time))
                solo_start, solo_speaker = None, None
            active.discard(speaker)
            if len(active) == 1:
                # an overlap ended: the remaining speaker's solo stretch starts buffer_time later
                solo_start, solo_speaker = time + buffer_time, next(iter(active))
    return out


def clean_cut(speaker_segments: Mapping[str, Sequence[Span]]) -> Dict[str, List[Span]]:
    """Overlaps cut at the overlap points: whoever starts talking takes over until someone else starts."""
    out: Dict[str, List[Span]] = {spk: [] for spk in speaker_segments}
    active: set = set()
    current: Dict[str, Optional[float]] = {spk: None for spk in speaker_segments}
    for time, kind, speaker in _events(speaker_segments):
        if kind == -1:
            if speaker in active:
                start = current[speaker]
                if start is not None:
                    if start < time:
                        out[speaker].append((start, time))
                    current[speaker] = None
                active.remove(speaker)
                for other in active:  # speakers still talking resume after the overlap
                    if current[other] is None:
                        current[other] = time
        else:
            for other in active:
                start = current[other]
                if start is not None:
                    if start < time:
                        out[other].append((start, time))
                    current[other] = None
            active.add(speaker)
            current[speaker] = time
    return out


def merge_adjacent(spans: Sequence[Span], gap_threshold: float) -> List[Span]:
    """Merge a speaker's segments separated by at most ``gap_threshold`` seconds."""
    merged: List[Span] = []
    for start, end in sorted(spans):
        if merged and start - merged[-1][1] <= gap_threshold:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def plan_split(speaker_segments: Mapping[str, Sequence[Span]], params: SplitParams = SplitParams()) -> Dict[str, List[Span]]:
    """Steps 1-3: each speaker's segments to keep (speakers may end up with none)."""
    if params.exclude_overlaps:
        spans = exclude_overlaps(speaker_segments, params.buffer_time)
    else:
        spans = clean_cut(speaker_segments)
    out: Dict[str, List[Span]] = {}
    for speaker, own in spans.items():
        merged = merge_adjacent(own, params.gap_threshold)
        if params.min_duration > 0:
            merged = [(s, e) for s, e in merged if e - s >= params.min_duration]
        out[speaker] = merged
    return out


def segments_from_turns(turns: Iterable[Turn]) -> Dict[str, List[Span]]:
    out: Dict[str, List[Span]] = {}
    for turn in turns:
        out.setdefault(turn.speaker, []).append((turn.start, turn.end))
    return out


@dataclasses.dataclass(frozen=True)
class SpeakerTrack:
    speaker: str
    audio: np.ndarray  # [frames, channels], as long as the input
    segments: List[Span]
    duration_s: float  # speech kept (sum of segment durations)


def separate(audio: np.ndarray, sample_rate: int, turns: Iterable[Turn],
             params: SplitParams = SplitParams()) -> Tuple[List[SpeakerTrack], int]:
    """Step 4: the per-speaker tracks, and Curator's ``num_speakers`` (speakers with audio, before the
    final ``min_duration`` check)."""
    data = np.asarray(audio)
    if data.ndim == 1:
        data = data[:, None]
    n = data.shape[0]
    plan = plan_split(segments_from_turns(turns), params)
    tracks: List[SpeakerTrack] = []
    for speaker in sorted(plan):
        spans = plan[speaker]
        total = float(sum(e - s for s, e in spans))
        if not spans or total < MIN_TOTAL_SECONDS:
            continue
        out = np.zeros_like(data)
        for start, end in spans:
            a = min(max(int(round(start * sample_rate)), 0), n)
            b = min(max(int(round(end * sample_rate)), 0), n)
            if a < b:
                out[a:b] = data[a:b]
        as_float = out.astype(np.float64)
        if np.issubdtype(out.dtype, np.integer):
            as_float /= float(2 ** (8 * out.dtype.itemsize - 1))
        if not out.size or np.sqrt(np.mean(as_float ** 2)) < SILENCE_RMS:
            continue
        tracks.append(SpeakerTrack(speaker, out, spans, total))
    num_speakers = len(tracks)
    return [t for t in tracks if t.duration_s >= params.min_duration], num_speakers


@dataclasses.dataclass(frozen=True)
class SpeakerFile:
    """One written speaker file (a manifest entry, Curator's fields plus the kept segments)."""

    audio_filepath: str
    source_audio: str
    speaker_id: str
    num_speakers: int
    duration_sec: float
    segments: List[Span]

    def as_dict(self) -> Dict[str, object]:
        out = dataclasses.asdict(self)
        out["segments"] = [[round(s, 6), round(e, 6)] for s, e in self.segments]
        return out


def split_file(audio_path: os.PathLike | str, turns: Sequence[Turn], out_dir: os.PathLike | str,
               params: SplitParams = SplitParams(), uri: Optional[str] = None) -> List[SpeakerFile]:
    """Write ``<out>/<uri>_<speaker>.wav`` per kept speaker (same rate, channels and sample format as the
    input) and ``<out>/<uri>_speakers.json``; the manifest entries."""
    import soundfile

    info = soundfile.info(os.fspath(audio_path))
    dtype = "int16" if info.subtype in ("PCM_16", "PCM_U8", "PCM_S8") else "float32"
    data, rate = soundfile.read(os.fspath(audio_path), dtype=dtype, always_2d=True)
    uri = safe_uri(uri or Path(audio_path).stem)
    tracks, num_speakers = separate(data, rate, turns, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: List[SpeakerFile] = []
    for track in tracks:
        path = out / f"{uri}_{safe_uri(track.speaker)}.wav"
        subtype = info.subtype if info.subtype in soundfile.available_subtypes("WAV") else None
        soundfile.write(os.fspath(path), track.audio, rate, subtype=subtype, format="WAV")
        entries.append(SpeakerFile(os.fspath(path), os.fspath(audio_path), track.speaker, num_speakers,
                                   round(track.duration_s, 6), list(track.segments)))
    manifest = out / f"{uri}_speakers.json"
    manifest.write_text(json.dumps({"uri": uri, "params": dataclasses.asdict(params),
                                    "speakers": [e.as_dict() for e in entries]}, indent=2) + "\n")
    return entries
