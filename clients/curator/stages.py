"""NeMo Curator stages that send audio to a shared Triton server instead of loading NeMo in every worker.

* ``TritonSortformerDiarizationStage``: Curator's ``InferenceSortformerStage`` (same ``filepath_key``,
  ``diar_segments_key`` = ``diar_segments`` of ``{start, end, speaker}``, optional ``rttm_out_dir``,
  ``session_name``);
* ``TritonSpeakerSeparationStage``: Curator's ``SpeakerSeparationStage`` (same defaults, one ``AudioTask``
  per kept speaker with ``waveform`` / ``sample_rate`` / ``speaker_id`` / ``num_speakers`` / ``duration`` /
  ``diar_segments``).

Both take ``url`` (a Triton server, or the proxy in front of several), ``protocol``, ``preset`` (a streaming
preset or ``"offline"``), ``timeout`` (seconds per request) and ``max_concurrency`` (sequences one worker
keeps in flight); ``process_batch`` diarizes the whole batch concurrently; ``setup`` connects once per
worker and checks the server and the model. They need CPUs only. The logic lives in ``clients.curator.core``.

This module imports Curator and torch (the ``AudioTask`` carries the waveform as a torch tensor, as Curator's
own stage does): run it in the Curator venv (``clients.curator.env``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch  # Curator's own dependency: per-speaker waveforms are torch tensors, as in Curator's stage
from loguru import logger
from nemo_curator.stages.audio.common import resolve_waveform_from_item
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import AudioTask
from nemo_curator.tasks.sentinels import FailedTask

from clients.diarize.split import (
    DEFAULT_BUFFER_TIME,
    DEFAULT_EXCLUDE_OVERLAPS,
    DEFAULT_GAP_THRESHOLD,
    DEFAULT_MIN_DURATION,
    SplitParams,
)
from clients.sortformer_client import load_audio, write_rttm
from clients.sortformer_client.client import DEFAULT_TIMEOUT_S

from . import core

ON_ERROR = ("raise", "fail")  # raise: the batch (and the pipeline) stops; fail: a FailedTask per failed task


@dataclass
class _TritonStage:
    """What both stages share: the server options, the per-worker client, per-task failures."""

    url: str = "localhost:8001"
    protocol: str = "grpc"
    preset: str = core.DEFAULT_PRESET
    timeout: float = DEFAULT_TIMEOUT_S
    max_concurrency: int = core.DEFAULT_MAX_CONCURRENCY
    segment_params: Optional[Dict[str, Any]] = None
    on_error: str = "raise"

    def _check_common(self) -> None:
        core.check_options(self.url, self.protocol, self.preset, self.timeout, self.max_concurrency)
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        self._client = None

    def setup(self, _worker_metadata: Any = None) -> None:
        """Connect once per worker; a clear error when the server is down or does not serve the model."""
        if getattr(self, "_client", None) is None:
            self._client = core.connect(self.url, self.protocol, self.preset, self.timeout)

    def teardown(self) -> None:
        if getattr(self, "_client", None) is not None:
            self._client.close()
            self._client = None

    def _diarize(self, audios: List[Optional[tuple]]) -> List[Optional[core.Outcome]]:
        self.setup()
        return core.diarize_many(self._client, audios, self.preset, self.max_concurrency, self.segment_params)

    def _failed(self, task: AudioTask, source: str, exc: BaseException) -> FailedTask:
        message = core.describe_failure(task.task_id, source, exc)
        if self.on_error == "raise":
            raise core.CuratorStageError(f"{self.name}: {message}") from exc
        logger.error(f"[{self.name}] {message}")
        return FailedTask()


@dataclass
class TritonSortformerDiarizationStage(_TritonStage, ProcessingStage[AudioTask, AudioTask]):
    """Speaker diarization by the Streaming Sortformer on a Triton server (Curator's
    ``InferenceSortformerStage``, the model served once instead of loaded per worker)."""

    filepath_key: str = "audio_filepath"
    diar_segments_key: str = "diar_segments"
    rttm_out_dir: Optional[str] = None
    name: str = "TritonSortformer_inference"
    batch_size: int = core.DEFAULT_MAX_CONCURRENCY
    resources: Resources = field(default_factory=lambda: Resources(cpus=1.0))

    def __post_init__(self) -> None:
        self._check_common()

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.filepath_key]

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.filepath_key, self.diar_segments_key]

    def process(self, task: AudioTask) -> AudioTask:
        return self.process_batch([task])[0]

    def process_batch(self, tasks: List[AudioTask]) -> List[AudioTask]:
        audios: List[Optional[tuple]] = []
        errors: Dict[int, BaseException] = {}
        for k, task in enumerate(tasks):
            try:
                audios.append(load_audio(task.data[self.filepath_key]))
            except (KeyError, ValueError, OSError) as exc:
                audios.append(None)
                errors[k] = exc
        outcomes = self._diarize(audios)
        out: List[AudioTask] = []
        for k, (task, outcome) in enumerate(zip(tasks, outcomes)):
            source = str(task.data.get(self.filepath_key, "?"))
            if k in errors or isinstance(outcome, BaseException):
                out.append(self._failed(task, source, errors.get(k, outcome)))
                continue
            segments = core.curator_segments(outcome)
            if self.rttm_out_dir is not None:
                import os

                os.makedirs(self.rttm_out_dir, exist_ok=True)
                name = core.session_name(task.data, self.filepath_key)
                write_rttm(os.path.join(self.rttm_out_dir, f"{name}.rttm"), name, outcome.segments,
                           outcome.speaker_names)
            data = dict(task.data)
            data[self.diar_segments_key] = segments
            out.append(AudioTask(dataset_name=task.dataset_name, filepath_key=task.filepath_key or self.filepath_key,
                                 data=data, _metadata=task._metadata, _stage_perf=task._stage_perf))
        return out


@dataclass
class TritonSpeakerSeparationStage(_TritonStage, ProcessingStage[AudioTask, AudioTask]):
    """One ``AudioTask`` per speaker (Curator's ``SpeakerSeparationStage``), diarized on a Triton server;
    the separation rules are ``clients.diarize.split`` (``diarize split``)."""

    exclude_overlaps: bool = DEFAULT_EXCLUDE_OVERLAPS
    min_duration: float = DEFAULT_MIN_DURATION
    gap_threshold: float = DEFAULT_GAP_THRESHOLD
    buffer_time: float = DEFAULT_BUFFER_TIME
    name: str = "TritonSpeakerSeparation"
    batch_size: int = core.DEFAULT_MAX_CONCURRENCY
    resources: Resources = field(default_factory=lambda: Resources(cpus=1.0))

    # as Curator's stage: parent keys that describe the whole file are not inherited
    _INHERITED_DROP_KEYS = frozenset({"audio", "waveform", "duration", "num_samples"})

    def __post_init__(self) -> None:
        self._check_common()
        self._params = SplitParams(exclude_overlaps=bool(self.exclude_overlaps), min_duration=self.min_duration,
                                   gap_threshold=self.gap_threshold, buffer_time=self.buffer_time)

    def inputs(self) -> tuple[list[str], list[str]]:
        return [], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return [], ["waveform", "sample_rate", "speaker_id", "num_speakers", "duration", "diar_segments"]

    def process(self, task: AudioTask) -> List[AudioTask]:
        return self.process_batch([task])

    def process_batch(self, tasks: List[AudioTask]) -> List[AudioTask]:
        items = [dict(task.data) for task in tasks]
        waves: List[Optional[tuple]] = []
        for task, item in zip(tasks, items):
            resolved = resolve_waveform_from_item(item, task.task_id)  # Curator's: mono [1, n] float32
            waves.append(None if resolved is None else (resolved[0].reshape(-1).numpy(), int(resolved[1])))
        outcomes = self._diarize(waves)
        out: List[AudioTask] = []
        for task, item, wave, outcome in zip(tasks, items, waves, outcomes):
            source = str(item.get("audio_filepath", "waveform"))
            if wave is None:  # Curator's stage: no audio, no speakers (logged by resolve_waveform_from_item)
                continue
            if isinstance(outcome, BaseException):
                out.append(self._failed(task, source, outcome))
                continue
            tracks, num_speakers = core.separate_speakers(wave[0], wave[1], outcome, self._params)
            if not tracks:
                logger.warning(f"[{self.name}] no speakers kept in {source}")
            inherited = {k: v for k, v in item.items() if k not in self._INHERITED_DROP_KEYS}
            for track in tracks:
                child = AudioTask(dataset_name=task.dataset_name, data={
                    **inherited,
                    "waveform": torch.from_numpy(np.ascontiguousarray(track.audio.reshape(1, -1))),
                    "sample_rate": wave[1],
                    "speaker_id": track.speaker,
                    "num_speakers": num_speakers,
                    "duration": track.duration_s,
                    "diar_segments": list(track.segments),
                })
                if task._metadata:
                    child._metadata = dict(task._metadata)
                out.append(child)
        return out


@dataclass
class SpeakerAudioWriterStage(ProcessingStage[AudioTask, AudioTask]):
    """Writes each speaker task's waveform to ``<out_dir>/<uri>_<speaker>.wav`` (float32: the tensor
    exactly; ``uri`` as ``diarize split`` names it) and replaces it in the task by ``speaker_audio_filepath``,
    so only the manifest fields travel back to the driver."""

    out_dir: str = "speakers"
    name: str = "SpeakerAudioWriter"
    batch_size: int = 16
    resources: Resources = field(default_factory=lambda: Resources(cpus=1.0))

    def inputs(self) -> tuple[list[str], list[str]]:
        return [], ["waveform", "sample_rate", "speaker_id"]

    def outputs(self) -> tuple[list[str], list[str]]:
        return [], ["speaker_audio_filepath"]

    def process(self, task: AudioTask) -> AudioTask:
        import os

        import soundfile

        data = dict(task.data)
        path = os.path.join(self.out_dir, core.speaker_file_name(data, data["speaker_id"]))
        os.makedirs(self.out_dir, exist_ok=True)
        soundfile.write(path, data.pop("waveform").reshape(-1).numpy(), int(data["sample_rate"]),
                        subtype="FLOAT", format="WAV")
        data["speaker_audio_filepath"] = path
        return AudioTask(dataset_name=task.dataset_name, data=data, _metadata=task._metadata,
                         _stage_perf=task._stage_perf)
