"""One browser session's diarization stream, driven without blocking the event loop.

The client library is synchronous (a ``Stream.feed`` blocks until Triton answered) and a ``Stream`` is
not thread-safe, so every call of one stream runs on that stream's own single worker thread, in order:
the event loop only awaits them. ``abort_soon`` queues the abort behind whatever call is running, so a
browser that disconnects mid-request still gets its Triton sequence ended (END sent, slot released).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from clients.sortformer_client import (
    DiarizationClient,
    DiarizationError,
    ModelUnavailable,
    RequestTimeout,
    Result,
    ServerUnavailable,
    SpeakerProfile,
    Stream,
    Update,
)

from . import messages
from .messages import Start

T = TypeVar("T")


def error_code(exc: BaseException) -> str:
    """The protocol's error code for an exception of the client library (or of the gateway)."""
    if isinstance(exc, messages.ProtocolError):
        return exc.code
    if isinstance(exc, ServerUnavailable):
        return messages.TRITON_UNAVAILABLE
    if isinstance(exc, ModelUnavailable):
        return messages.PRESET_UNAVAILABLE
    if isinstance(exc, RequestTimeout):
        return messages.TIMEOUT
    if isinstance(exc, DiarizationError):  # StreamError included
        return messages.STREAM_FAILED
    return messages.INTERNAL


class GatewayStream:
    """A ``Stream`` of the client library plus the one thread that drives it."""

    def __init__(self, client: DiarizationClient, start: Start,
                 enroll: Sequence[Tuple[str, np.ndarray]] = (), profile: Optional[SpeakerProfile] = None) -> None:
        self.client = client
        self.start = start
        self.enroll = tuple(enroll)
        # the gateway's profile is for its own preset: a browser stream on another preset starts empty
        self.profile = profile if profile is not None and profile.preset == client.preset.name else None
        self._stream: Optional[Stream] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                               thread_name_prefix="gateway-stream")
        self._finished = False

    @property
    def sequence_id(self) -> int:
        return self._require().sequence_id

    @property
    def speaker_names(self) -> Tuple[str, ...]:
        return self._require().speaker_names

    async def open(self) -> None:
        """Check that Triton serves the preset (``ServerUnavailable`` / ``ModelUnavailable``), then open
        the stream (nothing is sent to Triton before the first full step of audio)."""
        try:
            await self._call(self.client.check)
            self._stream = await self._call(self.client.open_stream,
                                            segment_params=self.start.segment_params or None,
                                            profile=self.profile)
            for name, clip in self.enroll:  # the gateway's enrollment clips, before the browser's audio
                await self._call(self._stream.enroll, name, clip, 16000)
        except BaseException:
            self._shutdown()
            raise

    async def feed(self, samples: np.ndarray) -> List[Update]:
        """Resample, re-chunk and send the complete steps; their updates."""
        stream = self._require()
        return await self._call(stream.feed, samples, self.start.sample_rate)

    async def close(self) -> Result:
        """The partial last step, the flush steps and END: the whole ``Result``."""
        stream = self._require()
        result = await self._call(stream.close)  # on an error the caller still calls abort_soon
        self._shutdown()
        return result

    def abort_soon(self) -> None:
        """End the stream (END to Triton, best effort) after the call now running; never blocks."""
        if self._finished:
            return
        if self._stream is not None:
            self._executor.submit(self._stream.abort)
        self._shutdown()

    # ---- internals --------------------------------------------------------------------------------
    def _require(self) -> Stream:
        if self._stream is None:
            raise RuntimeError("the stream is not open")
        return self._stream

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def _shutdown(self) -> None:
        self._finished = True
        self._executor.shutdown(wait=False)  # queued calls (an abort) still run


__all__ = ["GatewayStream", "error_code"]
