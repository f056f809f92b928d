"""The stream protocol: how a client cuts audio into requests and reassembles the answers.

Every request carries exactly ``preset.step_samples`` float32 samples (zero-padded) and the count of
valid ones. The first request with fewer valid samples than a full step marks the end of the audio (a
recording whose length is an exact multiple ends with a 0-sample step); 0-sample *flush* steps follow
until every chunk has been processed, the server running at most one chunk per request; the last request
carries END. ``presets.requests_for`` gives the count.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from .presets import N_SPEAKERS, Preset, output_frames_for, requests_for


@dataclasses.dataclass(frozen=True)
class StepRequest:
    audio: np.ndarray  # [step_samples] float32, zero-padded
    valid: int
    start: bool
    end: bool
    parameters: Optional[Mapping[str, Any]] = None  # this request's own parameters (e.g. ``enroll``)
    profile: Optional[Tuple[np.ndarray, np.ndarray]] = None  # PROFILE, PROFILE_HEADER of a START from a profile


def iter_steps(preset: Preset, audio: np.ndarray) -> Iterator[StepRequest]:
    """Cut a whole recording (16 kHz mono float32) into the requests of one stream."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    n = requests_for(preset, audio.size)
    step = preset.step_samples
    for i in range(n):
        piece = audio[i * step : (i + 1) * step]
        buf = np.zeros(step, dtype=np.float32)
        buf[: piece.size] = piece
        yield StepRequest(audio=buf, valid=int(piece.size), start=i == 0, end=i == n - 1)


class PredictionAssembler:
    """Concatenate the confirmed predictions of a stream's responses, checking their frame offsets."""

    def __init__(self) -> None:
        self._parts: List[np.ndarray] = []
        self.frames = 0
        self.tentative = np.zeros((0, N_SPEAKERS), dtype=np.float32)
        self.finished = False

    def add(self, confirmed: np.ndarray, n_confirmed: int, frame_offset: int,
            tentative: np.ndarray, n_tentative: int, finished: bool = False) -> None:
        if n_confirmed > 0:
            if frame_offset != self.frames:
                raise ValueError(f"confirmed frames arrived at offset {frame_offset}, expected {self.frames}")
            self._parts.append(np.array(confirmed[:n_confirmed], dtype=np.float32))  # a copy: no response kept
            self.frames += n_confirmed
        self.tentative = np.array(tentative[:n_tentative], dtype=np.float32)
        self.finished = self.finished or bool(finished)

    @property
    def confirmed(self) -> np.ndarray:
        if not self._parts:
            return np.zeros((0, N_SPEAKERS), dtype=np.float32)
        return np.concatenate(self._parts, axis=0)


def expected_frames(n_samples: int) -> int:
    """Frames a finished stream of n_samples must have confirmed (NeMo's whole-file count)."""
    return output_frames_for(n_samples)
