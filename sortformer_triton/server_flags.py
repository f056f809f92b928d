"""The tritonserver flags this project always runs with (local and production): safe defaults.

One source of truth for ``LocalTritonServer`` (the pytriton wheel's server) and the production
container (docker-compose.yml runs this file as its entrypoint: ``python3 server_flags.py -- tritonserver
ARGS...`` adds the flags and execs the server). Standard library only, so the NGC image runs it as a
plain script.

- ``--model-control-mode=none``: the models of the repository load at start; load/unload requests are
  refused;
- ``--strict-readiness=true``: ready only when every model is;
- the admin APIs are *restricted*: model repository (index, load, unload), shared memory (registering
  system/CUDA shared-memory regions that requests could then read), logging and trace settings answer
  only requests that carry the header ``triton-admin-key: <key>`` (over gRPC
  ``triton-grpc-protocol-triton-admin-key``; ``admin_headers`` builds them). The key comes from the environment
  variable ``SORTFORMER_TRITON_ADMIN_KEY``; unset, a random key is drawn per start and never shown, so
  those APIs are closed. Health, metadata, model config, statistics and inference stay open (clients,
  perf_analyzer and the metrics scrapers need them);
- HTTP *inference* is restricted too, to requests with the header ``triton-inference-key: <key>``
  (``SORTFORMER_TRITON_HTTP_INFERENCE_KEY``; unset: random, i.e. HTTP inference closed). Triton 2.51's
  HTTP JSON path allocates a tensor's *declared* shape before it compares it with the data: one
  150-byte request declaring ``[1, 2**40]`` floats makes tritonserver abort (``std::bad_alloc``), and a
  509 KiB gzip body inflates to 512 MiB. The restriction is checked before the body is read, so a
  request without the key costs nothing. gRPC inference stays open: its frontend compares shape and
  byte size before allocating (tests/test_server_safety.py sends the same requests). Give the HTTP
  key only to trusted clients (the client library reads it from the same variable); the HTTP health,
  metadata, config and statistics endpoints stay open for probes;
- request sizes: every input has fixed dims in the model configs, so Triton refuses any request whose
  tensors are not exactly one step (``unexpected shape``) before a model sees it. The HTTP/gRPC
  frontends of 2.51 have no byte limit of their own: put a reverse proxy with a body limit in front of a
  server exposed beyond localhost (docs/production.md).

Binding (127.0.0.1 locally; inside the container 0.0.0.0 with the ports published on 127.0.0.1 by
compose) is the launcher's business, not a flag here.
"""
from __future__ import annotations

import os
import secrets
import sys
from typing import Dict, List, Mapping, Optional, Sequence

ADMIN_KEY_ENV = "SORTFORMER_TRITON_ADMIN_KEY"
ADMIN_HEADER = "triton-admin-key"
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
HTTP_INFERENCE_KEY_ENV = "SORTFORMER_TRITON_HTTP_INFERENCE_KEY"
HTTP_INFERENCE_HEADER = "triton-inference-key"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # Triton's gRPC frontend expects the key name with this prefix


def admin_key(env: Optional[Mapping[str, str]] = None) -> str:
    """The admin key from ``SORTFORMER_TRITON_ADMIN_KEY``, else a fresh random one (APIs stay closed)."""
    return _key(ADMIN_KEY_ENV, env)


def http_inference_key(env: Optional[Mapping[str, str]] = None) -> str:
    """The HTTP inference key from ``SORTFORMER_TRITON_HTTP_INFERENCE_KEY``, else a fresh random one
    (HTTP inference stays closed; gRPC is unaffected)."""
    return _key(HTTP_INFERENCE_KEY_ENV, env)


def configured_http_inference_key(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The HTTP inference key set in the environment (None when unset): what a client sends."""
    value = (os.environ if env is None else env).get(HTTP_INFERENCE_KEY_ENV, "").strip()
    return _key(HTTP_INFERENCE_KEY_ENV, env) if value else None


def _key(variable: str, env: Optional[Mapping[str, str]]) -> str:
    value = (os.environ if env is None else env).get(variable, "").strip()
    if value and not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError(f"{variable} may hold only letters, digits, '-', '_' and '.'")
    return value or secrets.token_urlsafe(24).replace("-", "_")


def http_inference_headers(key: str) -> Dict[str, str]:
    """The header that opens HTTP inference."""
    return {HTTP_INFERENCE_HEADER: key}


def admin_headers(key: str, protocol: str) -> Dict[str, str]:
    """Request headers that open the restricted APIs (gRPC prefixes the key name, as Triton expects)."""
    if protocol == "http":
        return {ADMIN_HEADER: key}
    if protocol in ("grpc", "grpc-stream"):
        return {GRPC_HEADER_PREFIX + ADMIN_HEADER: key}
    raise ValueError(f"unknown protocol {protocol!r}")


def safe_flags(key: str, inference_key: Optional[str] = None) -> List[str]:
    """The flags that every tritonserver of this project gets (``inference_key``: the HTTP inference
    key; None draws it from the environment, else at random)."""
    restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={key}"
    inference = inference_key or http_inference_key()
    return [
        "--model-control-mode=none",
        "--strict-readiness=true",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        f"--http-restricted-api=inference:{HTTP_INFERENCE_HEADER}={inference}",
    ]


def command(server_argv: Sequence[str], key: str, inference_key: Optional[str] = None) -> List[str]:
    """``server_argv`` (``tritonserver ARGS...``) with the safe flags; a conflicting flag is refused."""
    if not server_argv:
        raise ValueError("no server command given (expected: tritonserver ARGS...)")
    flags = safe_flags(key, inference_key)
    names = {flag.split("=", 1)[0] for flag in flags}
    clash = [a for a in server_argv[1:] if a.split("=", 1)[0] in names]
    if clash:
        raise ValueError(f"these flags are set by sortformer_triton/server_flags.py, drop them: {clash}")
    return [*server_argv, *flags]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python3 server_flags.py -- tritonserver ARGS...``: exec the server with the safe flags."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        argv_out = command(args, admin_key())
    except ValueError as exc:
        print(f"server_flags: {exc}", file=sys.stderr)
        return 2
    os.execvp(argv_out[0], argv_out)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
