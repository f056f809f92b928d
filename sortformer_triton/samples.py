"""Synthetic multi-speaker conversations (numpy only) for tests, parity runs, benchmarks and demos.

Each speaker is a voiced source with its own pitch range and formants; turns alternate with pauses and
occasional overlaps, over a low noise floor (real recordings are never digitally silent). The reference
speaker turns come back with the audio, so DER can be computed against them.
"""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

import numpy as np

from .presets import SAMPLE_RATE

VOICES = [  # (f0 low, f0 high, formants Hz)
    (95.0, 140.0, (600.0, 1100.0, 2500.0)),
    (180.0, 260.0, (800.0, 1600.0, 2900.0)),
    (120.0, 170.0, (400.0, 2000.0, 2700.0)),
    (220.0, 320.0, (900.0, 1300.0, 3200.0)),
]


@dataclasses.dataclass(frozen=True)
class Turn:
    start: float
    end: float
    speaker: int


def _voice(rng: np.random.Generator, n: int, speaker: int) -> np.ndarray:
    lo, hi, formants = VOICES[speaker % len(VOICES)]
    t = np.arange(n) / SAMPLE_RATE
    # slowly gliding pitch, syllable-rate amplitude envelope
    f0 = lo + (hi - lo) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 0.7) * t + rng.uniform(0, 6.28)))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    sig = np.zeros(n)
    for h in range(1, 25):
        freq = h * f0
        gain = sum(np.exp(-((freq - f) / 150.0) ** 2) for f in formants) + 0.05
        sig += np.where(freq < SAMPLE_RATE / 2, gain * np.sin(h * phase), 0.0) / h**0.5
    env = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(3.0, 5.0) * t + rng.uniform(0, 6.28))
    return sig * env


def conversation(seconds: float, n_speakers: int = 3, seed: int = 0, overlap: float = 0.15,
                 noise_db: float = -60.0) -> Tuple[np.ndarray, List[Turn]]:
    """A conversation of `seconds` with `n_speakers` (1..4), its audio in [-1, 1] and its turns."""
    if not 1 <= n_speakers <= 4:
        raise ValueError("n_speakers must be 1..4")
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    audio = np.zeros(n)
    turns: List[Turn] = []
    pos, spk = 0.3, 0
    while pos < seconds:
        dur = rng.uniform(0.8, 3.5)
        start, end = pos, min(pos + dur, seconds)
        a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        if b > a:
            audio[a:b] += 0.25 * _voice(rng, b - a, spk)
            turns.append(Turn(start, end, spk))
        if rng.random() < overlap and n_speakers > 1:
            pos = max(0.0, end - rng.uniform(0.2, 0.8))  # the next speaker cuts in
        else:
            pos = end + rng.uniform(0.1, 1.2)
        spk = (spk + int(rng.integers(1, n_speakers))) % n_speakers if n_speakers > 1 else 0
    audio += 10 ** (noise_db / 20) * rng.standard_normal(n)
    return np.clip(audio, -1, 1).astype(np.float32), turns
