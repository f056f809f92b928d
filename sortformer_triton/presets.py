"""Latency presets and every size derived from them (one source of truth).

Units: an *output frame* is 80 ms = 8 mel frames = 1280 samples at 16 kHz. A *step* is one request of a
stream: ``chunk_len`` output frames of audio.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict

SAMPLE_RATE = 16000
HOP_SAMPLES = 160  # mel hop (10 ms)
WIN_SAMPLES = 400  # Hann window (25 ms)
N_FFT = 512
N_MELS = 128
SUBSAMPLING = 8  # mel frames per output frame
FRAME_SAMPLES = HOP_SAMPLES * SUBSAMPLING  # 1280 samples = 80 ms
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
N_SPEAKERS = 4
SPKCACHE_SIL_FRAMES_PER_SPK = 3  # NeMo default; the cache needs room for it


class PresetError(ValueError):
    """A preset or custom streaming configuration that cannot work."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """One streaming configuration of Streaming Sortformer (sizes in 80 ms output frames)."""

    name: str
    chunk_len: int
    right_context: int
    left_context: int
    fifo_len: int
    spkcache_update_period: int
    spkcache_len: int

    def __post_init__(self) -> None:
        validate(self)

    # ---- audio side -------------------------------------------------------------------------
    @property
    def step_samples(self) -> int:
        """Samples of audio in one request (one chunk)."""
        return self.chunk_len * FRAME_SAMPLES

    @property
    def step_seconds(self) -> float:
        return self.step_samples / SAMPLE_RATE

    @property
    def latency_seconds(self) -> float:
        """Algorithmic latency: (chunk + right context) x 80 ms."""
        return (self.chunk_len + self.right_context) * FRAME_SECONDS

    # ---- feature side ------------------------------------------------------------------------
    @property
    def window_mel_frames(self) -> int:
        """Mel frames of the sortformer step's feature window (left ctx + chunk + right ctx)."""
        return (self.left_context + self.chunk_len + self.right_context) * SUBSAMPLING

    @property
    def chunk_mel_frames(self) -> int:
        return self.chunk_len * SUBSAMPLING

    @property
    def new_mel_frames_max(self) -> int:
        """Most mel frames one request can complete (a full step, plus the end-of-audio edge)."""
        return self.chunk_mel_frames + 2

    @property
    def feature_buffer_frames(self) -> int:
        """Mel frames the preprocessor keeps: a window, plus one step of frames arriving early."""
        return self.window_mel_frames + self.chunk_mel_frames + 8

    # ---- model side ---------------------------------------------------------------------------
    @property
    def pop_out_max(self) -> int:
        """Most frames moved from the FIFO to the speaker cache in one step (NeMo's max_pop_out_len)."""
        return min(max(self.spkcache_update_period, self.chunk_len), self.chunk_len + self.fifo_len)

    def to_dict(self) -> Dict[str, int | str]:
        return dataclasses.asdict(self)


def validate(p: Preset) -> None:
    """Refuse configurations NeMo's streaming update cannot run, with a message saying why."""
    ints = {
        "chunk_len": (p.chunk_len, 1),
        "right_context": (p.right_context, 0),
        "left_context": (p.left_context, 0),
        "fifo_len": (p.fifo_len, 0),
        "spkcache_update_period": (p.spkcache_update_period, 1),
        "spkcache_len": (p.spkcache_len, (1 + SPKCACHE_SIL_FRAMES_PER_SPK) * N_SPEAKERS),
    }
    if not p.name or not p.name.replace("_", "").isalnum() or not p.name.islower():
        raise PresetError(f"preset name {p.name!r} must be lower-case letters, digits and '_'")
    for field, (value, minimum) in ints.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise PresetError(f"{field} must be an integer, got {value!r}")
        if value < minimum:
            why = ""
            if field == "spkcache_len":
                why = (
                    f" (the speaker cache must hold (1 + {SPKCACHE_SIL_FRAMES_PER_SPK} silence frames)"
                    f" x {N_SPEAKERS} speakers)"
                )
            raise PresetError(f"{field} must be at least {minimum}, got {value}{why}")
    if p.chunk_len > 1000:
        raise PresetError(f"chunk_len {p.chunk_len} frames ({p.chunk_len * FRAME_SECONDS:.0f} s) is over 1000")


PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("ultra_low", chunk_len=3, right_context=1, left_context=1, fifo_len=188,
               spkcache_update_period=144, spkcache_len=188),
        Preset("low", chunk_len=6, right_context=7, left_context=1, fifo_len=188,
               spkcache_update_period=144, spkcache_len=188),
        Preset("high", chunk_len=124, right_context=1, left_context=1, fifo_len=124,
               spkcache_update_period=124, spkcache_len=188),
        Preset("very_high", chunk_len=340, right_context=40, left_context=1, fifo_len=40,
               spkcache_update_period=300, spkcache_len=188),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def mel_frames_for(n_samples: int) -> int:
    """Mel frames NeMo's preprocessor yields for a whole file of n_samples (center STFT, last dropped)."""
    return n_samples // HOP_SAMPLES


def output_frames_for(n_samples: int) -> int:
    """Output (80 ms) frames NeMo's streaming loop yields for a whole file of n_samples."""
    return math.ceil(mel_frames_for(n_samples) / SUBSAMPLING)


def chunks_for(preset: Preset, n_samples: int) -> int:
    """Streaming steps (chunks) NeMo's loop runs for a whole file."""
    return math.ceil(mel_frames_for(n_samples) / preset.chunk_mel_frames)


def requests_for(preset: Preset, n_samples: int) -> int:
    """Requests a client sends for n_samples of audio: audio steps, then flush steps, END on the last.

    Audio steps carry ``step_samples`` each (the last one partial, or a zero-sample step when the audio
    is an exact multiple, so the server learns the audio ended). Flush steps (0 valid samples) follow
    until every chunk has been processed: the server runs at most one chunk per request.
    """
    full = n_samples // preset.step_samples  # then one request with the rest (possibly 0): end of audio
    # chunks still to run when that end-of-audio request arrives (the earlier ones ran on full windows);
    # it and each flush request run one, and it is sent even when none is left
    remaining = chunks_for(preset, n_samples) - _chunks_ready(preset, full * preset.step_samples)
    return full + max(remaining, 1)


def _chunks_ready(preset: Preset, samples: int) -> int:
    """Chunks whose whole window (with full right context) is exact after `samples` samples."""
    if samples < WIN_SAMPLES // 2:
        return 0
    exact_frames = (samples - WIN_SAMPLES // 2) // HOP_SAMPLES + 1
    ready = (exact_frames - preset.right_context * SUBSAMPLING) // preset.chunk_mel_frames
    return max(ready, 0)
