"""Audio in: any sample rate, channel layout and PCM type -> 16 kHz mono float32 (the model's input).

Resampling uses soxr (``HQ``) as a *stream*: the output of a recording fed in pieces is identical, sample
for sample, to the output of the whole recording at once (soxr keeps its filter state between pieces),
so how a caller splits its audio never changes what the server sees. A recording of ``n`` samples at
``rate`` Hz becomes ``round(n * 16000 / rate)`` samples.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from sortformer_triton.contract import MAX_ABS_AMPLITUDE
from sortformer_triton.presets import SAMPLE_RATE

PathLike = Union[str, "os.PathLike[str]"]

RESAMPLE_QUALITY = "HQ"


def to_mono_float32(samples: np.ndarray) -> np.ndarray:
    """One channel of float32 samples in [-1, 1] from any PCM array.

    ``samples`` is ``[frames]`` or ``[frames, channels]`` (soundfile's layout; channels are averaged).
    Integer PCM is scaled to [-1, 1): int16 / 32768, int32 / 2**31, uint8 (offset binary) (x - 128) / 128.
    """
    arr = np.asarray(samples)
    if arr.ndim not in (1, 2):
        raise ValueError(f"audio must be [frames] or [frames, channels], got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64) / float(2 ** (8 * arr.dtype.itemsize - 1))
    elif not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"audio must hold numbers (PCM), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.mean(axis=1)
    out = np.asarray(arr, dtype=np.float32)
    if out.size:
        peak = float(np.abs(out).max())  # NaN and inf carry through: one pass checks both
        if not np.isfinite(peak):
            raise ValueError("audio holds NaN or infinite samples")
        if peak > MAX_ABS_AMPLITUDE:
            raise ValueError(
                f"float audio must be in [-1, 1]; this peaks at {peak:g} (beyond the server's limit "
                f"+-{MAX_ABS_AMPLITUDE:g}): pass integer PCM as its integer array, or scale it (int16 / 32768)")
    return out


def check_sample_rate(sample_rate: object) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        if isinstance(sample_rate, float) and sample_rate.is_integer():
            sample_rate = int(sample_rate)
        else:
            raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if not 1000 <= int(sample_rate) <= 768000:
        raise ValueError(f"sample_rate must be 1000..768000 Hz, got {sample_rate}")
    return int(sample_rate)


class Resampler:
    """Streaming conversion of one recording to 16 kHz mono float32 (pass-through at 16 kHz)."""

    def __init__(self, sample_rate: int, quality: str = RESAMPLE_QUALITY) -> None:
        self.sample_rate = check_sample_rate(sample_rate)
        self._stream = None
        if self.sample_rate != SAMPLE_RATE:
            import soxr

            self._stream = soxr.ResampleStream(self.sample_rate, SAMPLE_RATE, 1, dtype="float32",
                                               quality=quality)
        self._flushed = False

    def process(self, samples: np.ndarray) -> np.ndarray:
        """The 16 kHz samples available after this piece (a resampler holds a few back until flush)."""
        if self._flushed:
            raise ValueError("this resampler was flushed: the recording already ended")
        mono = to_mono_float32(samples)
        if self._stream is None:
            return mono.copy()
        return self._stream.resample_chunk(np.ascontiguousarray(mono), last=False)

    def flush(self) -> np.ndarray:
        """The last 16 kHz samples (the recording ended)."""
        if self._flushed:
            return np.zeros(0, np.float32)
        self._flushed = True
        if self._stream is None:
            return np.zeros(0, np.float32)
        return self._stream.resample_chunk(np.zeros(0, np.float32), last=True)


def resample_to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """A whole recording as 16 kHz mono float32 (identical to feeding a ``Resampler`` piece by piece)."""
    resampler = Resampler(sample_rate)
    head = resampler.process(samples)
    tail = resampler.flush()
    return np.concatenate([head, tail]) if tail.size else head


def resampled_length(n_samples: int, sample_rate: int) -> int:
    """Samples at 16 kHz that ``n_samples`` at ``sample_rate`` become."""
    rate = check_sample_rate(sample_rate)
    return n_samples if rate == SAMPLE_RATE else int(round(n_samples * SAMPLE_RATE / rate))


def load_audio(path: PathLike, sample_rate: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """Read an audio file (any format libsndfile reads: wav, flac, ogg, mp3 ...): mono float32 and its rate.

    With ``sample_rate`` the audio is resampled to it (only 16000 is useful to the server).
    """
    import soundfile

    try:
        data, rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise ValueError(f"cannot read audio file {os.fspath(path)}: {exc}") from None
    mono = to_mono_float32(data)
    if sample_rate is not None and int(sample_rate) != rate:
        if int(sample_rate) != SAMPLE_RATE:
            raise ValueError("load_audio resamples only to 16000 Hz (the model's rate)")
        return resample_to_16k(mono, rate), SAMPLE_RATE
    return mono, int(rate)


_EXTENSION_FORMATS = {
    ".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".opus": "OGG", ".mp3": "MP3",
    ".aiff": "AIFF", ".aif": "AIFF", ".au": "AU", ".caf": "CAF", ".w64": "W64", ".rf64": "RF64",
}


def audio_extensions() -> Tuple[str, ...]:
    """File extensions (lower case, with the dot) of the formats this machine's libsndfile reads."""
    import soundfile

    formats = set(soundfile.available_formats())
    return tuple(sorted(ext for ext, fmt in _EXTENSION_FORMATS.items() if fmt in formats))


def load_named_clips(items: Sequence[str]) -> List[Tuple[str, np.ndarray, int]]:
    """``NAME=CLIP`` options (``--enroll``) loaded: (name, samples, sample_rate); ValueError names the bad one."""
    from sortformer_triton.speakers import check_name

    clips = []
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep or not path:
            raise ValueError(f"--enroll takes NAME=CLIP, got {item!r}")
        check_name(name)
        try:
            audio, rate = load_audio(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--enroll {name}: {exc}") from None
        clips.append((name, audio, rate))
    return clips
