"""The gateway's WebSocket protocol: what the browser may send, and the JSON it gets back.

Browser -> gateway, on ``/ws``:

1. text ``{"type": "start", "sample_rate": 48000, "preset": "low", "segment_params": {...}}``
   (``preset`` defaults to the gateway's ``--preset``; ``segment_params`` is optional: onset, offset,
   pad_onset, pad_offset, min_duration_on, min_duration_off, median_filter_frames);
2. binary frames: float32 little-endian mono PCM at ``sample_rate`` (any length up to ``MAX_FRAME_BYTES``);
3. text ``{"type": "stop"}``: the audio ended; the gateway flushes the stream and sends the result.

Gateway -> browser (text, JSON): ``started`` (the stream is open), one ``update`` per Triton response,
``result`` after ``stop``, and ``error`` (``code``, ``message``, ``stream_ended``). After a result or an
error that ended the stream, the connection may ``start`` again.

Everything here is pure (no I/O) so it is unit-tested without a server.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from clients.sortformer_client import Result, Segment, Update, speaker_label
from clients.sortformer_client.audio import check_sample_rate, to_mono_float32
from sortformer_triton.presets import FRAME_SECONDS, N_SPEAKERS, Preset
from sortformer_triton.timeline import PARAMETER_NAMES, parse_segment_params

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20  # one binary frame: 262144 float32 samples (5.4 s at 48 kHz)
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000

# error codes (``error.code``)
BAD_MESSAGE = "bad_message"  # not JSON, not an object, unknown type or keys, bad values
BAD_AUDIO = "bad_audio"  # a binary frame that is not float32 PCM (odd length, NaN, too large)
NOT_STARTED = "not_started"  # audio or stop without a stream
ALREADY_STARTED = "already_started"  # start while a stream is open
UNKNOWN_PRESET = "unknown_preset"  # not a preset name
PRESET_UNAVAILABLE = "preset_unavailable"  # a preset the Triton server does not serve (not loaded)
TRITON_UNAVAILABLE = "triton_unavailable"  # the Triton server cannot be reached
TIMEOUT = "timeout"  # a Triton request got no answer in time
STREAM_FAILED = "stream_failed"  # Triton refused a request of the stream
OVERLOADED = "overloaded"  # audio arrives faster than Triton diarizes it
BUSY = "busy"  # the gateway has its maximum number of streams open
TOO_MANY_CONNECTIONS = "too_many_connections"  # the gateway has its maximum of WebSockets open (then closes)
IDLE = "idle"  # a stream got no audio for idle_seconds and was ended
INTERNAL = "internal"  # a bug in the gateway (logged with its traceback)

START_KEYS = frozenset({"type", "preset", "sample_rate", "segment_params"})


class ProtocolError(ValueError):
    """A message the protocol does not allow; ``code`` is one of the error codes above."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class Start:
    """A validated ``start`` message."""

    preset: str
    sample_rate: int
    segment_params: Dict[str, Any]


def parse_text(text: str) -> Dict[str, Any]:
    """A text frame as a message object with a known ``type`` (``start`` or ``stop``)."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(BAD_MESSAGE, f"text frames must be JSON objects: {exc}") from None
    except RecursionError:  # e.g. [[[[...]]]] 100000 deep
        raise ProtocolError(BAD_MESSAGE, "text frames must be flat JSON objects: nested too deep") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_MESSAGE, f"a message must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind not in ("start", "stop"):
        raise ProtocolError(BAD_MESSAGE, f"unknown message type {kind!r}; expected 'start' or 'stop' "
                                         "(audio goes in binary frames)")
    if kind == "stop" and set(obj) != {"type"}:
        raise ProtocolError(BAD_MESSAGE, f"'stop' takes no fields, got {sorted(set(obj) - {'type'})}")
    return obj


def parse_start(obj: Mapping[str, Any], default_preset: str) -> Start:
    """Validate a ``start`` message; the preset name is checked against the server later."""
    unknown = sorted(set(obj) - START_KEYS)
    if unknown:
        raise ProtocolError(BAD_MESSAGE, f"unknown field(s) in 'start': {', '.join(unknown)}; "
                                         f"allowed: {', '.join(sorted(START_KEYS))}")
    preset = obj.get("preset", default_preset)
    if not isinstance(preset, str) or not preset:
        raise ProtocolError(BAD_MESSAGE, f"'preset' must be a preset name, got {preset!r}")
    if "sample_rate" not in obj:
        raise ProtocolError(BAD_MESSAGE, "'start' needs 'sample_rate' (Hz of the PCM that follows)")
    try:
        rate = check_sample_rate(obj["sample_rate"])
    except ValueError as exc:
        raise ProtocolError(BAD_MESSAGE, str(exc)) from None
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(BAD_MESSAGE, f"sample_rate must be {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, got {rate}")
    return Start(preset=preset, sample_rate=rate, segment_params=parse_segment_param_overrides(
        obj.get("segment_params")))


def parse_segment_param_overrides(raw: Any) -> Dict[str, Any]:
    """The optional ``segment_params`` object, validated like the postprocessor validates them."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError(BAD_MESSAGE, f"'segment_params' must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(PARAMETER_NAMES))
    if unknown:
        raise ProtocolError(BAD_MESSAGE, f"unknown segment parameter(s) {', '.join(unknown)}; "
                                         f"allowed: {', '.join(PARAMETER_NAMES)}")
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(BAD_MESSAGE, f"segment parameter {name} must be a number, got {value!r}")
    try:
        parse_segment_params(raw)
    except ValueError as exc:
        raise ProtocolError(BAD_MESSAGE, f"bad segment_params: {exc}") from None
    return dict(raw)


def decode_pcm(data: bytes) -> np.ndarray:
    """A binary frame as float32 mono samples (little-endian on the wire)."""
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(BAD_AUDIO, f"binary frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}; "
                                       "send the audio in smaller pieces")
    if len(data) % 4:
        raise ProtocolError(BAD_AUDIO, f"binary frames carry float32 samples: {len(data)} bytes is not a "
                                       "multiple of 4")
    try:  # the client library's own checks (NaN/inf, the server's amplitude limit)
        return to_mono_float32(np.frombuffer(data, dtype="<f4").astype(np.float32))
    except ValueError as exc:
        raise ProtocolError(BAD_AUDIO, str(exc)) from None


# ---- gateway -> browser ---------------------------------------------------------------------------
def segment_json(segment: Segment, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A segment in seconds (float32 values carried exactly), with its speaker slot and label (the slot's
    name, or speaker_<k>)."""
    return {"start": float(segment.start), "end": float(segment.end), "speaker": int(segment.speaker),
            "label": speaker_label(segment.speaker, names)}


def latest_probabilities(update: Update) -> Optional[Tuple[int, List[float]]]:
    """(frame, per-speaker probabilities) of the newest frame an update carries (tentative first)."""
    if update.n_tentative:
        return update.tentative_offset + update.n_tentative - 1, update.tentative[-1].tolist()
    if update.n_confirmed:
        return update.frame_offset + update.n_confirmed - 1, update.confirmed[-1].tolist()
    return None


def started_message(preset: Preset, sequence_id: int, sample_rate: int,
                    speaker_names: Sequence[str] = ("",) * N_SPEAKERS) -> Dict[str, Any]:
    return {
        "type": "started",
        "protocol": PROTOCOL_VERSION,
        "preset": preset.name,
        "sequence_id": str(sequence_id),  # 63-bit: a string, JavaScript numbers hold 53 bits
        "sample_rate": sample_rate,
        "frame_seconds": FRAME_SECONDS,
        "n_speakers": N_SPEAKERS,
        "step_seconds": preset.step_seconds,
        "latency_seconds": preset.latency_seconds,
        "speaker_names": list(speaker_names),
    }


def update_message(update: Update, sequence_id: int) -> Dict[str, Any]:
    """One Triton response of sequence ``sequence_id`` (a retried START moves a stream to a new id)."""
    latest = latest_probabilities(update)
    return {
        "type": "update",
        "sequence_id": str(sequence_id),
        "index": update.index,
        "frame_offset": update.frame_offset,
        "confirmed": update.confirmed.tolist(),
        "tentative_offset": update.tentative_offset,
        "tentative": update.tentative.tolist(),
        "finalized_segments": [segment_json(s, update.speaker_names) for s in update.finalized_segments],
        "tentative_segments": [segment_json(s, update.speaker_names) for s in update.tentative_segments],
        "speaker_names": list(update.speaker_names),
        "probabilities": latest[1] if latest else None,
        "probabilities_frame": latest[0] if latest else None,
        "frames_confirmed": update.tentative_offset,  # the stream's confirmed frames, this update's included
        "finished": update.finished,
        "end": update.end,
        "latency_ms": round(update.latency_s * 1000.0, 3),
    }


def result_message(result: Result) -> Dict[str, Any]:
    """The finished stream: every finalized segment (time order) and every confirmed frame."""
    segments = sorted(result.segments, key=lambda s: (s.start, s.end, s.speaker))
    return {
        "type": "result",
        "sequence_id": str(result.sequence_id),
        "preset": result.preset,
        "duration_s": result.duration_s,
        "n_frames": result.n_frames,
        "frame_seconds": result.frame_seconds,
        "requests": result.requests,
        "finished": result.finished,
        "segments": [segment_json(s, result.speaker_names) for s in segments],
        "speaker_names": list(result.speaker_names),
        "probabilities": result.probs.tolist(),
    }


def error_message(code: str, message: str, stream_ended: bool) -> Dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "stream_ended": stream_ended}


__all__ = [
    "ALREADY_STARTED", "BAD_AUDIO", "BAD_MESSAGE", "BUSY", "INTERNAL", "MAX_FRAME_BYTES", "NOT_STARTED",
    "OVERLOADED", "PRESET_UNAVAILABLE", "PROTOCOL_VERSION", "ProtocolError", "STREAM_FAILED", "Start",
    "TIMEOUT", "TOO_MANY_CONNECTIONS", "TRITON_UNAVAILABLE", "UNKNOWN_PRESET", "decode_pcm", "error_message", "latest_probabilities",
    "parse_start", "parse_text", "result_message", "segment_json", "started_message", "update_message",
]
