"""The logic of the Curator stages, importable without Curator, Ray or torch (numpy and our client only).

* ``connect``: one ``DiarizationClient`` per worker, checked (server live, the preset's ensemble ready) with
  a clear error otherwise;
* ``diarize_many``: a batch of recordings diarized concurrently, each as its own sequence (the server
  batches the sequences); one ``Result`` or one exception per recording, never a hang (every request has
  the client's timeout);
* ``curator_segments``: a ``Result`` as Curator's ``diar_segments`` (``[{start, end, speaker}]`` at the
  millisecond precision of NeMo's own ``diarize`` strings and of our RTTM files);
* ``separate_speakers``: the per-speaker tracks of Curator's SpeakerSeparation, by ``clients.diarize.split``
  (the same code as ``diarize split``; its rules are not written again here).
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from clients.diarize.split import SpeakerTrack, SplitParams, separate
from clients.sortformer_client import (
    PROTOCOLS,
    DiarizationClient,
    Result,
    Turn,
    parse_rttm,
    rttm_lines,
)
from clients.sortformer_client.client import DEFAULT_TIMEOUT_S
from sortformer_triton.presets import PRESETS

OFFLINE = "offline"  # the non-streaming Sortformer v1 model (DiarizationClient.diarize_offline)
DEFAULT_PRESET = "very_high"  # Curator's InferenceSortformerStage defaults: chunk 340, right context 40
DEFAULT_MAX_CONCURRENCY = 8  # sequences one worker keeps in flight

Outcome = Union[Result, BaseException]


class CuratorStageError(RuntimeError):
    """A task of a Triton-backed Curator stage failed; the message names the task and the cause."""


def check_preset(preset: str) -> str:
    if preset != OFFLINE and preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(sorted(PRESETS))} or {OFFLINE!r}, got {preset!r}")
    return preset


def check_options(url: str, protocol: str, preset: str, timeout: float, max_concurrency: int) -> None:
    """Refuse bad stage arguments when the stage is built (on the driver), not in a Ray worker."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"url must be host:port of the Triton server (or the proxy), got {url!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    check_preset(preset)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")


def connect(url: str, protocol: str = "grpc", preset: str = DEFAULT_PRESET,
            timeout: float = DEFAULT_TIMEOUT_S) -> DiarizationClient:
    """A checked client: raises ``ServerUnavailable`` (server down / wrong URL) or ``ModelUnavailable``
    (the preset's ensemble, or the offline model, is not served), each naming the URL and what is served."""
    check_preset(preset)
    streaming = preset if preset != OFFLINE else DEFAULT_PRESET
    client = DiarizationClient(url, protocol=protocol, preset=streaming, timeout=timeout)
    try:
        if preset == OFFLINE:
            client.check_offline()
        else:
            client.check()
    except BaseException:
        client.close()
        raise
    return client


def diarize_many(client: DiarizationClient, audios: Sequence[Optional[Tuple[np.ndarray, int]]], preset: str,
                 max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                 segment_params: Optional[Dict[str, Any]] = None) -> List[Optional[Outcome]]:
    """Diarize ``audios`` ((samples, sample_rate) each; ``None`` = nothing to do) concurrently: up to
    ``max_concurrency`` recordings in flight at once (one thread each; the client is thread-safe), each a
    sequence of its own (streaming presets, ``DiarizationClient.diarize``) or one request of its own
    (``offline``, ``DiarizationClient.diarize_offline``); the server batches them. Returns, in order, a
    ``Result``, the exception that recording raised (the others go on), or ``None``.
    """
    out: List[Optional[Outcome]] = [None] * len(audios)
    todo = [k for k, a in enumerate(audios) if a is not None]
    if not todo:
        return out

    def one(k: int) -> Outcome:
        samples, rate = audios[k]
        try:
            if preset == OFFLINE:
                return client.diarize_offline([samples], rate, segment_params=segment_params)[0]
            return client.diarize(samples, rate, segment_params=segment_params)
        except Exception as exc:  # noqa: BLE001 - reported per task
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(max_concurrency, len(todo))) as pool:
        for k, outcome in zip(todo, pool.map(one, todo)):
            out[k] = outcome
    return out


def result_turns(result: Result, uri: str = "recording") -> List[Turn]:
    """The result's segments as the RTTM ``diarize run`` writes carries them (millisecond times, labels
    ``speaker_<k>`` or the slot's name): what ``diarize split`` reads back."""
    return parse_rttm("\n".join(rttm_lines(uri, result.segments, result.speaker_names)))


def curator_segments(result: Result) -> List[Dict[str, Any]]:
    """Curator's ``diar_segments``: ``[{"start": s, "end": s, "speaker": label}]`` in start order."""
    return [{"start": t.start, "end": round(t.end, 3), "speaker": t.speaker} for t in result_turns(result)]


def session_name(data: Mapping[str, Any], filepath_key: str) -> str:
    """Curator's RTTM name: ``data["session_name"]``, else the audio file's name without extension."""
    name = data.get("session_name")
    if name is not None:
        return str(name)
    return os.path.splitext(os.path.basename(str(data[filepath_key])))[0]


def separate_speakers(waveform: np.ndarray, sample_rate: int, result: Result,
                      params: SplitParams = SplitParams()) -> Tuple[List[SpeakerTrack], int]:
    """The kept speakers' tracks (mono ``waveform`` masked outside each speaker's kept segments) and
    Curator's ``num_speakers``: ``clients.diarize.split.separate`` on the result's RTTM turns."""
    mono = np.asarray(waveform, dtype=np.float32).reshape(-1)
    return separate(mono, int(sample_rate), result_turns(result), params)


def describe_failure(task_id: str, source: str, exc: BaseException) -> str:
    return f"task {task_id or '?'} ({source}): {type(exc).__name__}: {exc}"


def speaker_file_name(data: Mapping[str, Any], speaker: str) -> str:
    """``<uri>_<speaker>.wav`` as ``diarize split`` names it (``uri``: ``session_name`` or the file's stem)."""
    from clients.sortformer_client import safe_uri

    return f"{safe_uri(session_name(data, 'audio_filepath'))}_{safe_uri(str(speaker))}.wav"
