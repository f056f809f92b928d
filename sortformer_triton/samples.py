"""Multi-speaker conversations for tests, parity runs, benchmarks and demos: synthetic voices (numpy only) and
espeak-ng speech (espeak_conversation).

Each speaker is a voiced source with its own pitch range and formants; turns alternate with pauses and
occasional overlaps, over a low noise floor (real recordings are never digitally silent). The reference
speaker turns come back with the audio, so DER can be computed against them.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

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


def _converse(seconds: float, n_speakers: int, seed: int, overlap: float, noise_db: float, speak,
              pause: Tuple[float, float]) -> Tuple[np.ndarray, List[Turn]]:
    """Alternating turns with pauses and overlaps: ``speak(rng, speaker, start_s)`` gives a turn's audio and
    its end in seconds; then the next speaker cuts in (probability ``overlap``) or waits ``pause`` seconds."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    audio = np.zeros(n)
    turns: List[Turn] = []
    pos, spk = 0.3, 0
    while pos < seconds:
        clip, end = speak(rng, spk, pos)
        if len(clip):
            a = int(pos * SAMPLE_RATE)
            audio[a: a + len(clip)] += clip
            turns.append(Turn(pos, end, spk))
        if rng.random() < overlap and n_speakers > 1:
            pos = max(0.0, end - rng.uniform(0.2, 0.8))  # the next speaker cuts in
        else:
            pos = end + rng.uniform(*pause)
        spk = (spk + int(rng.integers(1, n_speakers))) % n_speakers if n_speakers > 1 else 0
    audio += 10 ** (noise_db / 20) * rng.standard_normal(n)
    return np.clip(audio, -1, 1).astype(np.float32), turns


def _voices(n_speakers: int, voices: Optional[Sequence[int]], available: int) -> List[int]:
    chosen = list(range(n_speakers)) if voices is None else [int(v) for v in voices]
    if len(chosen) != n_speakers or not all(0 <= v < available for v in chosen):
        raise ValueError(f"voices must be {n_speakers} voice indices in 0..{available - 1}, got {voices!r}")
    return chosen


def conversation(seconds: float, n_speakers: int = 3, seed: int = 0, overlap: float = 0.15,
                 noise_db: float = -60.0, voices: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, List[Turn]]:
    """A conversation of `seconds` with `n_speakers` (1..4), its audio in [-1, 1] and its turns. ``voices``:
    the voice of each speaker (default speaker k speaks in voice k), e.g. ``n_speakers=1, voices=[2]`` for
    a monologue of voice 2 (an enrollment clip)."""
    if not 1 <= n_speakers <= 4:
        raise ValueError("n_speakers must be 1..4")
    chosen = _voices(n_speakers, voices, len(VOICES))

    def speak(rng: np.random.Generator, spk: int, start: float) -> Tuple[np.ndarray, float]:
        end = min(start + rng.uniform(0.8, 3.5), seconds)
        a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        return (0.25 * _voice(rng, b - a, chosen[spk]) if b > a else np.zeros(0)), end

    return _converse(seconds, n_speakers, seed, overlap, noise_db, speak, (0.1, 1.2))

# espeak-ng voices for speech-like conversations: (voice, pitch 0-99, words per minute, gain dB). Different
# timbres, pitches, rates and loudness, so a diarizer has something to tell apart (docs/parity.md).
ESPEAK_VOICES = [
    ("en-us+m3", 35, 160, 0.0),
    ("en+f3", 75, 175, -5.0),
    ("en-gb+m7", 20, 145, -9.0),
    ("en+f4", 90, 185, -2.5),
]
_WORDS = (
    "the meeting starts at nine and we still need the slides for the budget review so please send them "
    "before lunch I think the second quarter looked better than we expected but the travel costs went up "
    "again can you check the numbers with finance tomorrow morning we should also talk about hiring two "
    "more engineers for the streaming team because the backlog keeps growing every week and nobody has "
    "time to write the documentation that the customers keep asking for"
).split()


class SpeechSynthesisError(RuntimeError):
    """espeak-ng or sox is missing or failed."""


def _synthesize(text: str, voice: str, pitch: int, wpm: int) -> np.ndarray:
    """One utterance from espeak-ng, resampled by sox to 16 kHz mono float32 in [-1, 1]."""
    import io
    import shutil
    import subprocess

    import soundfile as sf

    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SpeechSynthesisError(f"{tool} is not installed (Debian: apt-get install espeak-ng sox)")
    try:
        wav = subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(wpm), "--stdout", text],
                             check=True, capture_output=True, timeout=60).stdout
        wav = subprocess.run(["sox", "--no-dither", "-t", "wav", "-", "-t", "wav", "-r", str(SAMPLE_RATE), "-c", "1",
                              "-e", "floating-point", "-b", "32", "-"],
                             input=wav, check=True, capture_output=True, timeout=60).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise SpeechSynthesisError(f"speech synthesis failed for voice {voice}: {exc}") from exc
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == SAMPLE_RATE
    return audio


def _voiced_span(audio: np.ndarray, threshold_db: float = -40.0) -> Tuple[int, int]:
    """First and last sample of 10 ms windows within threshold_db of the loudest."""
    hop = SAMPLE_RATE // 100
    n = len(audio) // hop
    if n == 0:
        return 0, len(audio)
    rms = np.sqrt((audio[: n * hop].reshape(n, hop).astype(np.float64) ** 2).mean(axis=1) + 1e-20)
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > threshold_db)
    return int(loud[0] * hop), int((loud[-1] + 1) * hop)


def espeak_conversation(seconds: float, n_speakers: int = 3, seed: int = 0, overlap: float = 0.15,
                        noise_db: float = -60.0,
                        voices: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, List[Turn]]:
    """Like :func:`conversation`, with espeak-ng speech: sentences in 1..4 voices of different pitch, rate and
    loudness, pauses and overlaps. Turns are the voiced span of each utterance. Needs espeak-ng and sox."""
    if not 1 <= n_speakers <= len(ESPEAK_VOICES):
        raise ValueError(f"n_speakers must be 1..{len(ESPEAK_VOICES)}")
    chosen = _voices(n_speakers, voices, len(ESPEAK_VOICES))
    n = int(round(seconds * SAMPLE_RATE))

    def speak(rng: np.random.Generator, spk: int, start: float) -> Tuple[np.ndarray, float]:
        voice, pitch, wpm, gain_db = ESPEAK_VOICES[chosen[spk]]
        words = rng.choice(_WORDS, size=int(rng.integers(3, 14)))
        clip = _synthesize(" ".join(words), voice, pitch, wpm)
        a, b = _voiced_span(clip)
        first = int(start * SAMPLE_RATE)
        last = min(first + (b - a), n)
        return clip[a: a + max(last - first, 0)] * 10 ** (gain_db / 20), last / SAMPLE_RATE

    return _converse(seconds, n_speakers, seed, overlap, noise_db, speak, (0.15, 1.2))


def write_enrollment_demo(out_dir, voices: str = "espeak", seed: int = 7) -> List[str]:
    """Sound files for named speakers: ``alice.wav`` and ``bob.wav`` (one voice each, 8 s), and
    ``meeting.wav`` / ``meeting2.wav`` (40 s / 30 s of both talking); the paths written."""
    from pathlib import Path

    import soundfile as sf

    make = espeak_conversation if voices == "espeak" else conversation
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "alice.wav": make(8.0, n_speakers=1, seed=seed, voices=[0])[0],
        "bob.wav": make(8.0, n_speakers=1, seed=seed + 1, voices=[1])[0],
        "meeting.wav": make(40.0, n_speakers=2, seed=seed + 2)[0],
        "meeting2.wav": make(30.0, n_speakers=2, seed=seed + 3)[0],
    }
    written = []
    for name, audio in files.items():
        sf.write(str(out / name), audio, SAMPLE_RATE, subtype="PCM_16")
        written.append(str(out / name))
    return written


def main(argv=None) -> int:
    import argparse
    import shutil

    parser = argparse.ArgumentParser(
        prog="python -m sortformer_triton.samples",
        description="Write the named-speakers demo files: alice.wav and bob.wav (one voice each, for --enroll) "
                    "and meeting.wav / meeting2.wav (both voices talking).")
    parser.add_argument("out", help="output directory")
    have_espeak = shutil.which("espeak-ng") is not None and shutil.which("sox") is not None
    parser.add_argument("--voices", choices=["espeak", "synthetic"], default="espeak" if have_espeak else "synthetic",
                        help="espeak-ng speech (default when espeak-ng and sox are installed) or synthetic voices")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    for path in write_enrollment_demo(args.out, args.voices, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
