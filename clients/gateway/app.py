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
from typing import AsyncIterator, Optional
from urllib.parse import urlsplit

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

log = logging.getLogger("clients.gateway")


def origin_allowed(origin: Optional[str], host: Optional[str], allowed: tuple) -> bool:
    """Browsers send ``Origin``; accept the gateway's own origin (same host:port), listed ones, and
    clients that send none (scripts). Stops other web sites from using the gateway through a visitor's
    browser (cross-site WebSocket hijacking)."""
    if not origin:
        return True
    if origin.rstrip("/") in {o.rstrip("/") for o in allowed} or "*" in allowed:
        return True
    return bool(host) and urlsplit(origin).netloc.lower() == str(host).lower()


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
        if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), config.allowed_origins):
            log.warning("refused a WebSocket from origin %s", ws.headers.get("origin"))
            await ws.close(code=POLICY_VIOLATION)
            return
        await ws.accept()
        gateway.connections += 1
        try:
            await Connection(ws, gateway).run()
        finally:
            gateway.connections -= 1

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


__all__ = ["STATIC_DIR", "create_app", "origin_allowed"]
