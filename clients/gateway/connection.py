"""One WebSocket connection: the protocol's state machine (idle -> streaming -> stopping -> idle).

A receive loop reads frames as they come; one *pump* task per stream takes the queued audio (all of it
that is waiting, in one piece), feeds it to the stream on the stream's worker thread and pushes every
update to the browser. On ``stop`` the pump closes the stream (tail flushed, END) and sends the result.
If the browser goes away, the stream is aborted so Triton's sequence slot is released at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
from starlette.websockets import WebSocket

from clients.sortformer_client import Update

from . import messages
from .messages import ProtocolError
from .runtime import Gateway
from .session import GatewayStream, error_code

log = logging.getLogger("clients.gateway")


class _Stop:
    """Queue marker: the browser sent ``stop``."""


STOP = _Stop()
QueueItem = Union[np.ndarray, _Stop]


class Connection:
    def __init__(self, websocket: WebSocket, gateway: Gateway) -> None:
        self.ws = websocket
        self.gateway = gateway
        self._open = True
        self._send_lock = asyncio.Lock()
        self._stream: Optional[GatewayStream] = None
        self._queue: "asyncio.Queue[QueueItem]" = asyncio.Queue()
        self._pump_task: Optional["asyncio.Task[None]"] = None
        self._stopping = False
        self._pending_samples = 0
        self._ended_why = ""  # why the last stream ended early (an error), for audio that still arrives

    async def run(self) -> None:
        """Serve the connection until the browser disconnects, or until it has had no stream for
        ``connection_idle_seconds`` (a connection holds one of ``max_connections`` places, stream or not)."""
        idle = self.gateway.config.connection_idle_seconds
        try:
            while True:
                if self._stream is None:
                    try:
                        async with asyncio.timeout(idle):
                            message = await self.ws.receive()
                    except TimeoutError:
                        await self._error(messages.IDLE, f"no stream for {idle:g} s: the connection is closed (it "
                                                         "held a gateway place); connect again to start one", False)
                        with contextlib.suppress(Exception):
                            await self.ws.close(code=1000)
                        return
                else:
                    message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    await self._on_audio(message["bytes"])
                elif message.get("text") is not None:
                    await self._on_text(message["text"])
        finally:
            self._open = False
            await self._end_stream()

    # ---- browser -> gateway ---------------------------------------------------------------------
    async def _on_text(self, text: str) -> None:
        try:
            obj = messages.parse_text(text)
        except ProtocolError as exc:
            await self._error(exc.code, str(exc), stream_ended=False)
            return
        if obj["type"] == "start":
            await self._on_start(obj)
        else:
            await self._on_stop()

    async def _on_start(self, obj: Dict[str, Any]) -> None:
        if self._stream is not None:
            await self._error(messages.ALREADY_STARTED, "a stream is already open on this connection; "
                                                        "send 'stop' and wait for its result first", False)
            return
        try:
            start = messages.parse_start(obj, self.gateway.config.default_preset)
            client = self.gateway.client(start.preset)
        except ProtocolError as exc:
            await self._error(exc.code, str(exc), stream_ended=False)
            return
        if not self.gateway.reserve_stream():
            await self._error(messages.BUSY, f"the gateway already serves {self.gateway.config.max_streams} "
                                             "streams; try again later", False)
            return
        stream = GatewayStream(client, start, self.gateway.config.enroll, self.gateway.config.profile)
        try:
            await stream.open()
        except Exception as exc:  # noqa: BLE001 -- reported to the browser
            self.gateway.release_stream()
            await self._exception(exc, stream_ended=False)
            return
        self._stream, self._stopping, self._pending_samples, self._ended_why = stream, False, 0, ""
        self._queue = asyncio.Queue()
        log.info("stream %d started (preset %s, %d Hz)", stream.sequence_id, start.preset, start.sample_rate)
        await self._send(messages.started_message(client.preset, stream.sequence_id, start.sample_rate,
                                                  stream.speaker_names))
        self._pump_task = asyncio.create_task(self._pump(stream, self._queue))

    async def _on_stop(self) -> None:
        if self._stream is None or self._stopping:
            await self._error(messages.NOT_STARTED, "'stop' without an open stream", stream_ended=False)
            return
        self._stopping = True
        self._queue.put_nowait(STOP)

    async def _on_audio(self, data: bytes) -> None:
        if self._stream is None or self._stopping:
            what = "after 'stop'" if self._stopping else (
                f"after the stream ended ({self._ended_why})" if self._ended_why else "before 'start'")
            await self._error(messages.NOT_STARTED, f"audio {what}: send a 'start' message first", False)
            return
        try:
            samples = messages.decode_pcm(data)
        except ProtocolError as exc:
            await self._end_stream()
            await self._error(exc.code, str(exc), stream_ended=True)
            return
        rate = self._stream.start.sample_rate
        self._pending_samples += samples.size
        limit = self.gateway.config.max_pending_seconds
        if self._pending_samples > limit * rate:
            pending = self._pending_samples / rate
            await self._end_stream()
            await self._error(messages.OVERLOADED, f"{pending:.1f} s of audio are waiting for Triton (limit "
                                                   f"{limit:g} s): the server diarizes slower than real time",
                              stream_ended=True)
            return
        self._queue.put_nowait(samples)

    # ---- the stream ---------------------------------------------------------------------------------
    async def _pump(self, stream: GatewayStream, queue: "asyncio.Queue[QueueItem]") -> None:
        try:
            idle = self.gateway.config.idle_seconds
            while True:
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
                    # arrives as the item does, and _end_stream waits for this task to end
                    async with asyncio.timeout(idle):
                        items = [await queue.get()]
                except TimeoutError:
                    stream.abort_soon()
                    self._detach(stream)
                    await self._error(messages.IDLE, f"no audio for {idle:g} s: the stream was ended (its "
                                                     "Triton sequence is freed); send 'start' again", True)
                    return
                while not queue.empty():
                    items.append(queue.get_nowait())
                audio = [item for item in items if isinstance(item, np.ndarray)]
                if audio:
                    samples = np.concatenate(audio) if len(audio) > 1 else audio[0]
                    updates = await stream.feed(samples)
                    self._pending_samples -= samples.size
                    await self._send_updates(updates, stream.sequence_id)
                if any(item is STOP for item in items):
                    result = await stream.close()
                    await self._send_updates(result.tail_updates, result.sequence_id)
                    self._detach(stream)  # idle before the result: the browser may start again at once
                    await self._send(messages.result_message(result))
                    log.info("stream %d finished: %.1f s, %d frames, %d segments", result.sequence_id,
                             result.duration_s, result.n_frames, len(result.segments))
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- reported to the browser
            stream.abort_soon()
            self._detach(stream)
            await self._exception(exc, stream_ended=True)

    async def _send_updates(self, updates: Iterable[Update], sequence_id: int) -> None:
        for update in updates:
            await self._send(messages.update_message(update, sequence_id))

    def _detach(self, stream: GatewayStream) -> None:
        """The stream is over (closed or aborted): back to idle."""
        if self._stream is stream:
            self._stream, self._pump_task, self._stopping = None, None, False
            self.gateway.release_stream()

    async def _end_stream(self) -> None:
        """Stop the pump and abort the open stream, if any (errors, disconnects)."""
        stream, task = self._stream, self._pump_task
        if stream is None:
            return
        self._detach(stream)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stream.abort_soon()
        log.info("stream %d aborted", stream.sequence_id)

    # ---- gateway -> browser ---------------------------------------------------------------------------
    async def _exception(self, exc: BaseException, stream_ended: bool) -> None:
        code = error_code(exc)
        if code == messages.INTERNAL:
            log.exception("internal error", exc_info=exc)
            text = f"internal gateway error ({type(exc).__name__}: {exc})"
        else:
            text = str(exc)
        await self._error(code, text, stream_ended)

    async def _error(self, code: str, message: str, stream_ended: bool) -> None:
        log.info("error sent to client: %s: %s", code, message)
        if stream_ended:
            self._ended_why = code
        await self._send(messages.error_message(code, message, stream_ended))

    async def _send(self, obj: Dict[str, Any]) -> None:
        if not self._open:
            return
        text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
        async with self._send_lock:
            try:
                await self.ws.send_text(text)
            except Exception:  # noqa: BLE001 -- the browser went away; the receive loop ends the stream
                self._open = False


__all__ = ["Connection"]
