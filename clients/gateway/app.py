"""The ASGI application (Starlette): the page, its static files, health checks and the WebSocket.

Routes:
    GET /            the page (static/index.html)
    GET /static/...  its script, AudioWorklet and stylesheet
    GET /health      the gateway process is up: {"status": "ok", streams ...} (always 200)
    GET /ready       200 when Triton serves at least one preset, else 503 with the reason
    GET /api/info    what the page needs: served presets, the default preset, frame length
    WS  /ws          the diarization protocol (clients.gateway.messages)
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import AsyncIterator, Optional, Tuple

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from sortformer_triton.presets import FRAME_SECONDS, N_SPEAKERS

from . import messages
from .connection import Connection
from .runtime import Gateway, GatewayConfig

STATIC_DIR = Path(__file__).resolve().parent / "static"
POLICY_VIOLATION = 1008  # WebSocket close code for a refused origin
TRY_AGAIN_LATER = 1013  # WebSocket close code for a connection beyond --max-connections

log = logging.getLogger("clients.gateway")


def origin_allowed(origin: Optional[str], allowed: tuple) -> bool:
    """Browsers send ``Origin``; accept listed origins (``GatewayConfig.allowed_origins``: the gateway's
    own page origins and the ``--allowed-origin`` ones) and clients that send none (scripts). Stops other
    web sites from using the gateway through a visitor's browser (cross-site WebSocket hijacking). The
    ``Host`` header is never trusted: with DNS rebinding a hostile page sends ``Host: evil.example`` and a
    matching ``Origin``."""
    if not origin:
        return True
    return origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed} or "*" in allowed


def page_origins(host: str, port: int, scheme: str = "http") -> Tuple[str, ...]:
    """The origins of the gateway's own page when served on ``host:port`` (loopback and wildcard binds
    add ``localhost`` and ``127.0.0.1``)."""
    names = {host}
    if host in ("0.0.0.0", "::", "127.0.0.1", "localhost", "::1"):
        names |= {"localhost", "127.0.0.1"}
    return tuple(sorted(f"{scheme}://{f'[{n}]' if ':' in n else n}:{port}" for n in names))


def create_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "connections": gateway.connections,
                             "streams": gateway.active_streams, "triton_streams": gateway.triton_streams})

    async def ready(request: Request) -> JSONResponse:
        presets, error = await gateway.served_presets()
        if presets:
            return JSONResponse({"status": "ready", "triton_url": config.triton_url, "presets": presets})
        why = error or f"Triton at {config.triton_url} serves no diarizer_<preset> ensemble"
        return JSONResponse({"status": "unavailable", "triton_url": config.triton_url, "error": why},
                            status_code=503)

    async def info(request: Request) -> JSONResponse:
        presets, error = await gateway.served_presets()
        return JSONResponse({
            "protocol": messages.PROTOCOL_VERSION, "presets": presets, "default_preset": config.default_preset,
            "triton": "ready" if presets else "unavailable", "error": error, "frame_seconds": FRAME_SECONDS,
            "n_speakers": N_SPEAKERS, "max_frame_bytes": messages.MAX_FRAME_BYTES,
        })

    async def websocket(ws: WebSocket) -> None:
        if not origin_allowed(ws.headers.get("origin"), config.allowed_origins):
            log.warning("refused a WebSocket from origin %s", ws.headers.get("origin"))
            await ws.close(code=POLICY_VIOLATION)
            return
        await ws.accept()
        if not gateway.reserve_connection():
            # accepted to say why (a refused handshake reaches a browser as a bare 1006), then closed
            why = (f"the gateway already has {config.max_connections} connections open (--max-connections); "
                   "try again later")
            log.warning("refused a WebSocket: %s", why)
            with contextlib.suppress(Exception):
                await ws.send_json(messages.error_message(messages.TOO_MANY_CONNECTIONS, why, False))
                await ws.close(code=TRY_AGAIN_LATER, reason="too many connections")
            return
        try:
            await Connection(ws, gateway).run()
        finally:
            gateway.release_connection()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info("gateway for Triton at %s (default preset %s)", config.triton_url, config.default_preset)
        try:
            yield
        finally:
            gateway.close()

    app = Starlette(routes=[
        Route("/", index),
        Route("/health", health),
        Route("/ready", ready),
        Route("/api/info", info),
        WebSocketRoute("/ws", websocket),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ], lifespan=lifespan)
    app.state.gateway = gateway
    return app


__all__ = ["STATIC_DIR", "create_app", "origin_allowed", "page_origins"]
