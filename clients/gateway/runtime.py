"""What the gateway shares between connections: its settings, one client per preset, stream counts."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any, Dict, List, Optional, Tuple

from clients.sortformer_client import DiarizationClient, DiarizationError, normalize_url

from . import messages
from .messages import ProtocolError

DEFAULT_TRITON_URL = "127.0.0.1:8001"
DEFAULT_PRESET = "low"
TRITON_PROTOCOL = "grpc-stream"  # one bidirectional gRPC stream per diarization stream


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    """Settings of one gateway process (``python -m clients.gateway --help`` explains each)."""

    triton_url: str = DEFAULT_TRITON_URL
    default_preset: str = DEFAULT_PRESET
    timeout_s: float = 30.0  # per Triton request
    max_streams: int = 64
    max_connections: int = 256  # WebSockets open at once (a stream needs one; more are refused and closed)
    max_pending_seconds: float = 30.0  # audio waiting for Triton before a stream is ended as overloaded
    idle_seconds: float = 30.0  # a stream without audio for this long is ended ('idle'), freeing its slot
    connection_idle_seconds: float = 60.0  # a connection without a stream for this long is closed ('idle')
    allowed_origins: Tuple[str, ...] = ()  # browser origins allowed (the gateway's own page included)
    # (name, 16 kHz samples): enrollment clips every stream plays first, so its page shows these names
    enroll: Tuple[Tuple[str, Any], ...] = ()
    profile: Any = None  # a SpeakerProfile every stream starts from (its preset only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "triton_url", normalize_url(self.triton_url, "grpc"))
        if min(self.timeout_s, self.max_pending_seconds, self.idle_seconds, self.connection_idle_seconds) <= 0:
            raise ValueError("timeout_s, max_pending_seconds, idle_seconds and connection_idle_seconds must be > 0")
        if self.max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")


class Gateway:
    """Clients of the Triton server (one ``DiarizationClient`` per preset, thread-safe and shared by every
    connection) and the count of open streams. Counters are touched from the event loop only."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._clients: Dict[str, DiarizationClient] = {}
        self._lock = threading.Lock()
        self.active_streams = 0
        self.connections = 0
        # validates the default preset at start-up (ProtocolError(unknown_preset) is a ValueError); any
        # preset's client answers served_presets
        self._admin = self.client(config.default_preset)

    def _make_client(self, preset: str) -> DiarizationClient:
        return DiarizationClient(self.config.triton_url, protocol=TRITON_PROTOCOL, preset=preset,
                                 timeout=self.config.timeout_s)

    def client(self, preset: str) -> DiarizationClient:
        """The shared client of ``preset``; ``ProtocolError(unknown_preset)`` for a name that is none."""
        with self._lock:
            client = self._clients.get(preset)
            if client is None:
                try:
                    client = self._make_client(preset)
                except ValueError as exc:
                    raise ProtocolError(messages.UNKNOWN_PRESET, str(exc)) from None
                self._clients[preset] = client
            return client

    def reserve_connection(self) -> bool:
        if self.connections >= self.config.max_connections:
            return False
        self.connections += 1
        return True

    def release_connection(self) -> None:
        self.connections = max(0, self.connections - 1)

    def reserve_stream(self) -> bool:
        if self.active_streams >= self.config.max_streams:
            return False
        self.active_streams += 1
        return True

    def release_stream(self) -> None:
        self.active_streams = max(0, self.active_streams - 1)

    @property
    def triton_streams(self) -> int:
        """Streams the client library still holds open (aborted ones leave once their END was sent)."""
        with self._lock:
            clients = list(self._clients.values())
        return sum(c.open_streams for c in clients)

    async def served_presets(self) -> Tuple[List[str], Optional[str]]:
        """(presets Triton serves, None) or ([], why not) -- without blocking the event loop."""
        try:
            return await asyncio.to_thread(self._admin.served_presets), None
        except DiarizationError as exc:
            return [], str(exc)

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()


__all__ = ["DEFAULT_PRESET", "DEFAULT_TRITON_URL", "Gateway", "GatewayConfig", "TRITON_PROTOCOL"]
