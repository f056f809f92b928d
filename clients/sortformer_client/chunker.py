"""Incremental version of ``sortformer_triton.protocol.iter_steps``: audio arriving in any pieces ->
exactly the requests ``iter_steps`` makes from the whole recording.

``iter_steps`` needs the recording's length up front (the number of flush steps follows from it). A live
stream does not know it: full steps go out as soon as their samples are there, and ``finish`` (the
recording ended) sends the partial last step, the flush steps and END. Full steps never depend on the
total length, so the result is the same request for request (``tests/test_client.py`` checks this for
arbitrary splits against ``iter_steps``).
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional

import numpy as np

from sortformer_triton.presets import Preset, requests_for
from sortformer_triton.protocol import StepRequest


class StepChunker:
    """Cut one stream's 16 kHz mono float32 audio into protocol steps as it arrives."""

    def __init__(self, preset: Preset) -> None:
        self.preset = preset
        self._pending: List[np.ndarray] = []
        self._pending_samples = 0
        self._requests = 0  # steps handed out so far
        self._samples = 0  # samples received so far
        self._finished = False

    @property
    def samples(self) -> int:
        """16 kHz samples received so far."""
        return self._samples

    @property
    def requests(self) -> int:
        """Steps handed out so far."""
        return self._requests

    @property
    def pending_samples(self) -> int:
        """Samples received but not yet sent (less than one step)."""
        return self._pending_samples

    @property
    def finished(self) -> bool:
        return self._finished

    def push(self, samples: np.ndarray) -> List[StepRequest]:
        """Add samples; the full steps that are complete now (none of them carries END)."""
        if self._finished:
            raise ValueError("the stream's audio already ended (finish was called)")
        arr = np.asarray(samples, dtype=np.float32).reshape(-1)
        if arr.size:
            self._pending.append(arr)
            self._pending_samples += arr.size
            self._samples += arr.size
        step = self.preset.step_samples
        out: List[StepRequest] = []
        if self._pending_samples < step:
            return out
        buf = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n_full = buf.size // step
        for k in range(n_full):
            out.append(self._step(buf[k * step:(k + 1) * step].copy(), step, end=False))
        rest = buf[n_full * step:]
        self._pending = [rest] if rest.size else []
        self._pending_samples = int(rest.size)
        return out

    def push_clip(self, samples: np.ndarray, parameters: Mapping[str, Any]) -> List[StepRequest]:
        """A whole clip (e.g. an enrollment clip), zero-padded to full steps, each step carrying
        ``parameters``; only at a step boundary (no partial step pending)."""
        if self._finished:
            raise ValueError("the stream's audio already ended (finish was called)")
        if self._pending_samples:
            raise ValueError(f"a clip must start at a step boundary; {self._pending_samples} samples of a step "
                             f"are pending")
        arr = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not arr.size:
            raise ValueError("the clip has no samples")
        step = self.preset.step_samples
        n = -(-arr.size // step)
        padded = np.zeros(n * step, np.float32)
        padded[:arr.size] = arr
        self._samples += n * step
        return [self._step(padded[k * step:(k + 1) * step], step, end=False, parameters=parameters)
                for k in range(n)]

    def finish(self) -> List[StepRequest]:
        """The recording ended: the partial last step, the flush steps, END on the last one."""
        if self._finished:
            raise ValueError("finish was already called")
        self._finished = True
        total = requests_for(self.preset, self._samples)
        step = self.preset.step_samples
        rest = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
        self._pending, self._pending_samples = [], 0
        out: List[StepRequest] = []
        remaining = total - self._requests
        if remaining < 1:  # cannot happen: requests_for >= full steps + 1
            raise AssertionError(f"protocol gives {total} requests but {self._requests} were already sent")
        for k in range(remaining):
            buf = np.zeros(step, np.float32)
            valid = 0
            if k == 0 and rest.size:
                buf[:rest.size] = rest
                valid = int(rest.size)
            out.append(self._step(buf, valid, end=k == remaining - 1))
        return out

    def _step(self, audio: np.ndarray, valid: int, end: bool,
              parameters: Optional[Mapping[str, Any]] = None) -> StepRequest:
        req = StepRequest(audio=audio, valid=valid, start=self._requests == 0, end=end,
                          parameters=dict(parameters) if parameters else None)
        self._requests += 1
        return req
