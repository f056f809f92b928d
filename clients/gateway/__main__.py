"""``python -m clients.gateway``: serve the web page and the WebSocket gateway with uvicorn.

Defaults come from the environment (what docker-compose.yml sets): SORTFORMER_TRITON_URL,
SORTFORMER_GATEWAY_HOST, SORTFORMER_GATEWAY_PORT, SORTFORMER_GATEWAY_PRESET.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Mapping, Optional, Sequence

from . import messages
from .runtime import DEFAULT_PRESET, DEFAULT_TRITON_URL, GatewayConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clients.gateway",
        description="Web gateway: a page that streams the microphone over a WebSocket; the gateway streams "
                    "it to Triton (gRPC, one sequence per connection) and pushes every update back.")
    parser.add_argument("--triton-url", default=environ.get("SORTFORMER_TRITON_URL", DEFAULT_TRITON_URL),
                        help="Triton gRPC host:port (env SORTFORMER_TRITON_URL; default %(default)s)")
    parser.add_argument("--host", default=environ.get("SORTFORMER_GATEWAY_HOST", DEFAULT_HOST),
                        help="address to listen on (env SORTFORMER_GATEWAY_HOST; default %(default)s: this "
                             "machine only)")
    parser.add_argument("--port", type=int, default=environ.get("SORTFORMER_GATEWAY_PORT", str(DEFAULT_PORT)),
                        help="port (env SORTFORMER_GATEWAY_PORT; default %(default)s)")
    parser.add_argument("--preset", default=environ.get("SORTFORMER_GATEWAY_PRESET", DEFAULT_PRESET),
                        help="preset of a 'start' message that names none (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per Triton request")
    parser.add_argument("--max-streams", type=int, default=64, help="streams open at once (more get 'busy')")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="WebSocket connections open at once (more get 'too_many_connections' and are "
                             "closed with code 1013)")
    parser.add_argument("--max-pending-seconds", type=float, default=30.0,
                        help="audio a stream may have waiting for Triton before it is ended as overloaded")
    parser.add_argument("--idle-seconds", type=float, default=30.0,
                        help="a stream that gets no audio for this long is ended (frees its Triton sequence)")
    parser.add_argument("--connection-idle-seconds", type=float, default=60.0,
                        help="a connection without a stream for this long (none started, or the last one over) is "
                             "closed with 'idle' (frees its --max-connections place)")
    parser.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web origin (https://host:port) allowed to open the WebSocket besides the "
                             "gateway's own page; repeatable; '*' allows any")
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS/WSS with this certificate (browsers "
                                                              "allow the microphone only on https or localhost)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key")
    parser.add_argument("--enroll", action="append", default=[], metavar="NAME=CLIP",
                        help="every stream first plays CLIP and names the slot that takes it NAME (repeatable): "
                             "the page shows the names")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="every stream starts from this saved speaker profile (.npz), with its names")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def parse_args(argv: Optional[Sequence[str]] = None,
               environ: Optional[Mapping[str, str]] = None) -> argparse.Namespace:
    parser = build_parser(os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    try:
        args.config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1..65535, got {args.port}")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    return args


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    from sortformer_triton.presets import get_preset

    from .app import page_origins

    get_preset(args.preset)  # PresetError (a ValueError) names the known presets
    from clients.sortformer_client import SpeakerProfile, load_named_clips, resample_to_16k

    enroll = tuple((name, resample_to_16k(audio, rate)) for name, audio, rate in load_named_clips(args.enroll))
    profile = SpeakerProfile.load(args.profile) if args.profile else None
    return GatewayConfig(enroll=enroll, profile=profile, triton_url=args.triton_url, default_preset=args.preset, timeout_s=args.timeout,
                         max_streams=args.max_streams, max_connections=args.max_connections,
                         max_pending_seconds=args.max_pending_seconds,
                         idle_seconds=args.idle_seconds, connection_idle_seconds=args.connection_idle_seconds,
                         allowed_origins=tuple(args.allowed_origin) + page_origins(
                             args.host, args.port, "https" if args.ssl_certfile else "http"))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scheme = "https" if args.ssl_certfile else "http"
    print(f"gateway: {scheme}://{args.host}:{args.port}/ -> Triton {args.config.triton_url} "
          f"(default preset {args.preset})", flush=True)
    uvicorn.run(create_app(args.config), host=args.host, port=args.port, log_level=args.log_level,
                ws_max_size=messages.MAX_FRAME_BYTES + 4096, ssl_certfile=args.ssl_certfile,
                ssl_keyfile=args.ssl_keyfile, proxy_headers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
