"""Typed client library of the Streaming Sortformer diarization service on Triton.

One library for the ``diarize`` CLI, the tests, load tests and gateways. It imports ``sortformer_triton``
(presets, tensor contract, stream protocol, segment codec) and tritonclient; never ``export``, torch or
NeMo.

Public API::

    DiarizationClient(url, protocol="grpc" | "grpc-stream" | "http", preset="low", timeout=60.0,
                      max_in_flight=1, retry=RetryPolicy(attempts=3, backoff_s=0.5))
        .check() / .served_presets()
        .open_stream(sequence_id=None, segment_params=None, on_update=None, speaker_names=None,
                     profile=None) -> Stream
        .diarize(audio, sample_rate=16000, progress=None, segment_params=None, enroll=(), speaker_names=None,
                 profile=None, save_profile=False) -> Result
        .diarize_file(path_or_array, sample_rate=None, ...same keywords) -> Result
        .diarize_offline(audios, sample_rate=16000, segment_params=None, concurrency=8) -> list[Result]
        .check_offline()   (the offline Sortformer v1, diarizer_offline: one request per recording)
    Stream.enroll(name, samples, sample_rate=16000) -> list[Update]  (before the first feed)
    Stream.feed(samples, sample_rate=16000) -> list[Update];  Stream.close(save_profile=False) -> Result
    Stream.request_profile();  Stream.profile;  Stream.speaker_names;  Stream.abort()
    Update, Result (.speaker_names, .label(k), .profile), Segment;  SpeakerProfile (.save/.load), ProfileError;
    StepChunker;  RTTM/JSON writers;  load_named_clips (NAME=CLIP options);  errors: DiarizationError,
    ServerUnavailable, ModelUnavailable, StreamError, RequestTimeout
"""
from sortformer_triton.profiles import ProfileError, SpeakerProfile
from sortformer_triton.timeline import Segment

from .audio import Resampler, load_audio, load_named_clips, resample_to_16k, resampled_length, to_mono_float32
from .chunker import StepChunker
from .client import DEFAULT_TIMEOUT_S, DiarizationClient, Stream, new_sequence_id
from .errors import DiarizationError, ModelUnavailable, RequestTimeout, ServerUnavailable, StreamError
from .results import Result, Update, speaker_label
from .retry import NO_RETRY, RetryPolicy
from .rttm import Turn, parse_rttm, read_rttm, rttm_lines, safe_uri, write_json, write_rttm
from .transport import PROTOCOLS, normalize_url

__all__ = [
    "DEFAULT_TIMEOUT_S", "DiarizationClient", "DiarizationError", "ModelUnavailable", "NO_RETRY", "PROTOCOLS",
    "ProfileError", "RequestTimeout", "Resampler", "Result", "RetryPolicy", "Segment", "ServerUnavailable",
    "SpeakerProfile", "StepChunker", "Stream", "StreamError", "Turn", "Update", "load_audio", "load_named_clips",
    "new_sequence_id", "normalize_url", "parse_rttm", "read_rttm", "resample_to_16k", "resampled_length",
    "rttm_lines", "safe_uri", "speaker_label", "to_mono_float32", "write_json", "write_rttm",
]
