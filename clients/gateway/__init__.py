"""Web gateway: a browser page streams its microphone over a WebSocket; the gateway streams the audio to
Triton through the client library (gRPC streaming, one sequence per connection) and pushes every update
back; the page draws a live per-speaker timeline.

    python -m clients.gateway --triton-url 127.0.0.1:8001 --host 127.0.0.1 --port 8080 [--preset low]

Modules: ``messages`` (the WebSocket protocol, pure functions), ``session`` (one stream on its own worker
thread), ``connection`` (one WebSocket's state machine), ``runtime`` (settings, shared clients), ``app``
(the Starlette routes), ``static/`` (the page).
"""
from .app import create_app
from .runtime import Gateway, GatewayConfig

__all__ = ["Gateway", "GatewayConfig", "create_app"]
