"""The offline diarizer (Sortformer v1: whole recordings, no streaming state) on Triton: names, shapes, rules.

``diarizer_offline`` = ``offline_admission`` (Python: refuses a bad request before any compute) ->
``sortformer_offline`` (ONNX, dynamic batching over recordings) -> ``offline_postprocessor`` (Python:
segments). A request is one recording: AUDIO [N] float32 16 kHz mono zero-padded, AUDIO_LENGTH [1] its
valid samples. Triton batches requests whose AUDIO has the same N, so clients pad to a multiple of
``BUCKET_SAMPLES`` (recordings of similar length then share a batch); the server accepts recordings of up to
the repository's ``max_samples`` valid samples, padded up to that limit's bucket (``--offline-max-seconds`` at export; NeMo's v1 was trained on 90 s sessions).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

from .contract import AUDIO, AUDIO_LENGTH, MAX_ABS_AMPLITUDE, N_SEGMENTS, SEGMENTS, ModelIO, Tensor, step_tensor
from .presets import FRAME_SAMPLES, N_SPEAKERS, SAMPLE_RATE

ENSEMBLE = "diarizer_offline"
ADMISSION = "offline_admission"
SORTFORMER = "sortformer_offline"
POSTPROCESSOR = "offline_postprocessor"
MODELS = (ENSEMBLE, ADMISSION, SORTFORMER, POSTPROCESSOR)

PREDS = "PREDS"  # float32 [frames, 4]: per-frame speaker probabilities (80 ms frames), zero past N_FRAMES
N_FRAMES = "N_FRAMES"  # int64 [1]: the recording's frames
ADMITTED_AUDIO_LENGTH = "ADMITTED_AUDIO_LENGTH"

DEFAULT_MAX_SECONDS = 90.0
BUCKET_SAMPLES = 5 * SAMPLE_RATE  # clients pad AUDIO to a multiple of 5 s
MAX_SAMPLES_PARAMETER = "max_samples"  # config parameter of offline_admission


def sortformer_io() -> ModelIO:
    return ModelIO(inputs=[Tensor(AUDIO, "float32", (-1,)), Tensor(AUDIO_LENGTH, "int64", (1,))],
                   outputs=[Tensor(PREDS, "float32", (-1, N_SPEAKERS)), Tensor(N_FRAMES, "int64", (1,))])


def admission_io() -> ModelIO:
    """Reads the request, passes its length on: the graph reads AUDIO_LENGTH from here, so it runs only on
    admitted requests (an ensemble stops at a step's error); AUDIO goes to the graph untouched."""
    return ModelIO(inputs=[Tensor(AUDIO, "float32", (-1,)), Tensor(AUDIO_LENGTH, "int64", (1,))],
                   outputs=[Tensor(ADMITTED_AUDIO_LENGTH, "int64", (1,))])


def postprocessor_io() -> ModelIO:
    passed = sortformer_io().outputs
    return ModelIO(inputs=[dataclasses.replace(t, name=step_tensor(t.name)) for t in passed],
                   outputs=list(passed) + [Tensor(SEGMENTS, "float32", (-1, 4)), Tensor(N_SEGMENTS, "int32", (1,))])


def ensemble_io() -> ModelIO:
    return ModelIO(inputs=admission_io().inputs, outputs=postprocessor_io().outputs)


def max_samples_for(seconds: float) -> int:
    """Samples of the longest admitted recording: whole 80 ms frames."""
    if not (isinstance(seconds, (int, float)) and 1.0 <= seconds <= 3600.0):
        raise ValueError(f"the offline model's maximum duration must be 1..3600 s, got {seconds!r}")
    return int(seconds * SAMPLE_RATE) // FRAME_SAMPLES * FRAME_SAMPLES


def padded_length(n_samples: int) -> int:
    """AUDIO's length for a recording of ``n_samples``: the next multiple of BUCKET_SAMPLES."""
    return max(1, -(-int(n_samples) // BUCKET_SAMPLES)) * BUCKET_SAMPLES


def request_error(audio: np.ndarray, length: np.ndarray, max_samples: int) -> Optional[str]:
    """Why a request (AUDIO [rows, N], AUDIO_LENGTH [rows, 1]; rows = the client's batch, usually 1) is refused,
    or None. Checked before any compute."""
    if audio.ndim != 2:
        return f"AUDIO must be [samples] (one recording per request), got shape {list(audio.shape[1:])}"
    n = audio.shape[1]
    too_long = (f"this offline model takes recordings of at most {max_samples} samples ({max_samples / SAMPLE_RATE:.1f} "
                "s) per request: split the recording, or stream it through a diarizer_<preset> ensemble")
    if n > padded_length(max_samples):  # a client pads the longest admitted recording up to its 5 s bucket
        return f"AUDIO holds {n} samples ({n / SAMPLE_RATE:.1f} s); {too_long}"
    lengths = length.reshape(-1)
    if lengths.size != audio.shape[0]:
        return f"AUDIO_LENGTH must hold one value per recording, got {lengths.size} for {audio.shape[0]}"
    for row, valid in zip(audio, lengths):
        if not FRAME_SAMPLES <= int(valid) <= n:
            return (f"AUDIO_LENGTH {int(valid)} must be between {FRAME_SAMPLES} (one 80 ms frame) and the {n} "
                    "samples AUDIO holds")
        if int(valid) > max_samples:
            return f"AUDIO_LENGTH {int(valid)} ({int(valid) / SAMPLE_RATE:.1f} s): {too_long}"
        samples = row[: int(valid)]
        if not np.isfinite(samples).all():
            return "AUDIO holds NaN or Inf"
        if np.abs(samples).max(initial=0.0) > MAX_ABS_AMPLITUDE:
            return (f"AUDIO holds samples beyond +-{MAX_ABS_AMPLITUDE}: float audio is in [-1, 1] (int16 PCM must "
                    "be divided by 32768)")
    return None


def frames_of(n_samples: int) -> int:
    """The model's output frames for a recording of ``n_samples`` (NeMo: mel frames n // 160, then / 8)."""
    mel = n_samples // 160
    return (mel + 7) // 8 if mel else 0


def split_batch(preds: np.ndarray, n_frames: np.ndarray) -> List[Tuple[np.ndarray, int]]:
    """A batch's [B, T, 4] predictions and [B, 1] counts -> per request (its valid frames, count)."""
    out = []
    for row, count in zip(preds, n_frames.reshape(-1)):
        k = int(np.clip(count, 0, row.shape[0]))
        out.append((np.ascontiguousarray(row[:k], dtype=np.float32), k))
    return out


def segments_batch(preds: np.ndarray, n_frames: np.ndarray, params) -> Tuple[np.ndarray, np.ndarray]:
    """The offline postprocessor's arithmetic: PREDS [rows, T, 4] + N_FRAMES [rows, 1] -> SEGMENTS [rows, S, 4]
    (every segment finalized; S >= 1 rows, zeros after each row's count) + N_SEGMENTS [rows, 1] int32, with
    ``timeline.segments_from_probs`` over each recording's valid frames (the same segments as a stream of the
    same predictions gives at END)."""
    from .segments_codec import pack_segments
    from .timeline import segments_from_probs

    per_row = [segments_from_probs(p, params) for p, _ in split_batch(preds, n_frames)]
    width = max([1] + [len(s) for s in per_row])
    rows = np.zeros((len(per_row), width, 4), np.float32)
    counts = np.zeros((len(per_row), 1), np.int32)
    for i, segments in enumerate(per_row):
        rows[i], counts[i, 0] = pack_segments(segments, width)
    return rows, counts
