"""Several tritonservers behind one HAProxy: every request of a sequence reaches the replica holding its state.

A stream's state (speaker cache, FIFO, timeline) lives in one tritonserver. Per-request balancing breaks
every stream: START lands on one replica, the next step on another, which refuses it ("must specify the
START flag"). This module writes the HAProxy configuration (one source of truth for the local replica
set, the compose profile and the Kubernetes ConfigMap) that keeps sequences where they started:

- the client library sends the sequence id in the header ``x-sequence-id`` on every request (unary
  gRPC metadata, the gRPC stream's opening headers, HTTP headers; ``sequence_headers``);
- HAProxy's *stick table* remembers, per sequence id, the replica its START went to (chosen by
  ``leastconn`` among the healthy ones), and sends every later request with that id to the same
  replica. Unlike a hash of the id, the table does not move running sequences when replicas come and
  go: a replica that rejoins takes new sequences only;
- ``option persist`` without ``option redispatch``: a request of a sequence whose replica is down is
  *not* moved to a replica without its state; it fails (HTTP 503, gRPC UNAVAILABLE: the client's
  ``ServerUnavailable``), and the client's START retry (a new sequence id) lands on a survivor.
  Streams of the other replicas never notice;
- HTTP health checks on ``/v2/health/ready`` (the gRPC backend checks the same replica's HTTP port)
  take a dead replica out of the choice for new sequences within ``check_interval_ms * fall``.

Which protocols need the header: HTTP and unary gRPC send each request on its own, so every request
needs it. A gRPC *stream* is one HTTP/2 stream that HAProxy keeps on one replica for its lifetime; the
header (sent once, when the stream opens) only spreads streams across replicas and records them.

Standard library only: the Kubernetes ConfigMap and the compose profile are rendered from this module
by ``python -m sortformer_triton.proxy``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Dict, List, Optional, Sequence, Tuple

SEQUENCE_HEADER = "x-sequence-id"
BALANCES: Tuple[str, ...] = ("affinity", "round_robin")
GRPC_BACKEND = "triton_grpc"
HTTP_BACKEND = "triton_http"
# which backend (and stick table) a client protocol's requests go through
BACKENDS_BY_PROTOCOL = {"grpc": GRPC_BACKEND, "grpc-stream": GRPC_BACKEND, "http": HTTP_BACKEND}
HEALTH_PATH = "/v2/health/ready"

# A sequence's stick-table entry is refreshed by each of its requests; it must outlive the longest
# sequence idle timeout (very_high: 110 s; sortformer_triton.repository.idle_timeout_us), or a slow but
# live stream would lose its replica. Sequence ids are decimal uint64 (at most 20 characters).
DEFAULT_STICK_EXPIRE_S = 1800
DEFAULT_STICK_ENTRIES = 1_000_000
STICK_KEY_CHARS = 24
DEFAULT_CHECK_INTERVAL_MS = 1000
DEFAULT_CHECK_FALL = 2
DEFAULT_CHECK_RISE = 2
# one request is one step: the largest preset's step (very_high 27.2 s of 16 kHz FP32 = 1.74 MB) as
# binary HTTP data, or as JSON text (<= 16 bytes per float), plus room for the JSON header
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_TIMEOUT_S = 300  # longer than the slowest step (very_high) plus a full backlog wait


PROXY_ERRORS = {
    502: "unavailable: the replica failed while answering (proxy: bad gateway)",
    503: "unavailable: no live replica for this request (proxy: the replica holding the sequence is down)",
    504: "unavailable: the replica did not answer in time (proxy: gateway timeout)",
}


def sequence_headers(sequence_id: int) -> Dict[str, str]:
    """The header a request of sequence ``sequence_id`` carries so a proxy can keep it on one replica."""
    return {SEQUENCE_HEADER: str(int(sequence_id))}


@dataclasses.dataclass(frozen=True)
class Replica:
    """One tritonserver as the proxy sees it (``host`` may be a DNS name)."""

    name: str
    host: str
    http_port: int = 8000
    grpc_port: int = 8001

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"replica name must be letters, digits, '-' or '_', got {self.name!r}")
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"replica host must be a host name or address, got {self.host!r}")
        for port in (self.http_port, self.grpc_port):
            _check_port(port)


@dataclasses.dataclass(frozen=True)
class Discovery:
    """Replicas found through DNS SRV records (Kubernetes: a headless Service of a StatefulSet).

    ``service`` is the Service's DNS name; HAProxy's ``server-template`` keeps ``max_replicas`` server
    slots and fills them from the SRV records of the named ports (``_<port>._tcp.<service>``), asking the
    nameserver of the proxy's own ``/etc/resolv.conf`` (in a pod: the cluster DNS)."""

    service: str
    max_replicas: int = 8
    http_port_name: str = "http"
    grpc_port_name: str = "grpc"

    def __post_init__(self) -> None:
        if self.max_replicas < 1:
            raise ValueError(f"max_replicas must be >= 1, got {self.max_replicas}")


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    """What the proxy listens on and how it chooses replicas.

    ``balance``: ``affinity`` (this module's point) or ``round_robin`` (every request to the next
    replica: shows what breaks without affinity; never for production)."""

    bind: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    stats_socket: Optional[str] = None  # HAProxy's runtime API (show stat / show table)
    stats_port: Optional[int] = None  # HAProxy's own Prometheus metrics at /metrics
    balance: str = "affinity"
    # re-resolve listed replicas' host names through this DNS server (compose: Docker's 127.0.0.11:53),
    # so a replica container that restarts with a new address is found again
    nameserver: Optional[str] = None
    stick_expire_s: int = DEFAULT_STICK_EXPIRE_S
    stick_entries: int = DEFAULT_STICK_ENTRIES
    check_interval_ms: int = DEFAULT_CHECK_INTERVAL_MS
    check_fall: int = DEFAULT_CHECK_FALL
    check_rise: int = DEFAULT_CHECK_RISE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout_s: int = DEFAULT_TIMEOUT_S
    max_connections: int = 4096

    def __post_init__(self) -> None:
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {self.balance!r}")
        for port in (self.http_port, self.grpc_port, self.stats_port):
            if port is not None:
                _check_port(port)
        for name in ("stick_expire_s", "stick_entries", "check_interval_ms", "check_fall", "check_rise",
                     "max_body_bytes", "timeout_s", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an integer in 1..65535, got {port!r}")


# ---- the configuration ----------------------------------------------------------------------------
def haproxy_config(replicas: Sequence[Replica] | Discovery, settings: ProxySettings = ProxySettings()) -> str:
    """HAProxy 2.6 configuration text: a gRPC (HTTP/2) and an HTTP frontend, one backend each over the
    same replicas, health-checked on ``/v2/health/ready``, with sequence affinity (see the module doc)."""
    if not isinstance(replicas, Discovery):
        replicas = list(replicas)
        if not replicas:
            raise ValueError("the proxy needs at least one replica")
        names = [r.name for r in replicas]
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique, got {names}")
    s = settings
    lines: List[str] = [
        "# Generated by sortformer_triton/proxy.py: do not edit; regenerate instead.",
        "global",
        f"    maxconn {s.max_connections}",
        "    log stderr format short local0 warning",
    ]
    if s.stats_socket:
        lines.append(f"    stats socket {s.stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option dontlognull",
        "    timeout connect 2s",
        f"    timeout client {s.timeout_s}s",
        f"    timeout server {s.timeout_s}s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 60s",
        "    timeout check 2s",
        # a failed connection is retried on the same replica, never on another (no redispatch): a step of
        # a running sequence must not reach a replica that lacks its state
        "    retries 2",
        "    no option redispatch",
        # errors of the proxy itself in Triton's JSON error shape, so HTTP clients read them (tritonclient
        # parses every error body as JSON); gRPC clients see the status (503 = UNAVAILABLE)
        *(f"    http-error status {code} content-type application/json string '{{\"error\":\"{text}\"}}'"
          for code, text in PROXY_ERRORS.items()),
        "",
    ]
    if isinstance(replicas, Discovery) or s.nameserver:
        lines += [
            "resolvers cluster",
            f"    nameserver dns {s.nameserver}" if s.nameserver else "    parse-resolv-conf",  # else the pod's (kube-dns)
            "    accepted_payload_size 8192",
            "    hold valid 5s",
            "    hold nx 5s",
            "    hold obsolete 5s",
            "",
        ]
    lines += _frontend("grpc_in", s.bind, s.grpc_port, GRPC_BACKEND, h2=True, settings=s)
    lines += _frontend("http_in", s.bind, s.http_port, HTTP_BACKEND, h2=False, settings=s)
    lines += _backend(GRPC_BACKEND, replicas, "grpc", s)
    lines += _backend(HTTP_BACKEND, replicas, "http", s)
    if s.stats_port is not None:
        lines += [
            "frontend stats",
            f"    bind {s.bind}:{s.stats_port}",
            "    http-request use-service prometheus-exporter if { path /metrics }",
            "    stats enable",
            "    stats uri /stats",
            "    stats refresh 5s",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _frontend(name: str, bind: str, port: int, backend: str, h2: bool, settings: ProxySettings) -> List[str]:
    lines = [f"frontend {name}", f"    bind {bind}:{port}" + (" proto h2" if h2 else "")]
    if not h2:
        # one request is one step: refuse bodies larger than any step before reading them (gRPC
        # messages are bounded by Triton's shape checks, which run before any allocation)
        lines.append(f"    http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt {settings.max_body_bytes} }}")
    lines += [f"    default_backend {backend}", ""]
    return lines


def _backend(name: str, replicas: Sequence[Replica] | Discovery, kind: str, s: ProxySettings) -> List[str]:
    lines = [f"backend {name}"]
    if s.balance == "affinity":
        lines += [
            "    balance leastconn",
            f"    stick-table type string len {STICK_KEY_CHARS} size {s.stick_entries} expire {s.stick_expire_s}s",
            f"    stick on req.hdr({SEQUENCE_HEADER})",
            "    option persist",
        ]
    else:
        lines.append("    balance roundrobin")
    discovered = isinstance(replicas, Discovery)
    if kind == "http" or not discovered:
        # readiness over HTTP; the gRPC server of a listed replica is checked on its HTTP port
        lines += [f"    option httpchk GET {HEALTH_PATH}", "    http-check expect status 200"]
    lines.append(f"    default-server inter {s.check_interval_ms}ms fall {s.check_fall} rise {s.check_rise}")
    if discovered:
        d = replicas
        port_name = d.grpc_port_name if kind == "grpc" else d.http_port_name
        # the headless Service's SRV records list ready pods only: a replica that is not ready leaves
        # every backend at the next resolution; the gRPC port gets a connect check on top
        lines.append(f"    server-template replica {d.max_replicas} _{port_name}._tcp.{d.service} check "
                     f"resolvers cluster init-addr none resolve-prefer ipv4" + (" proto h2" if kind == "grpc" else ""))
    else:
        dns = " resolvers cluster init-addr last,libc,none" if s.nameserver else ""
        for r in replicas:
            if kind == "grpc":
                lines.append(f"    server {r.name} {r.host}:{r.grpc_port} proto h2 check port {r.http_port} "
                             f"check-proto h1{dns}")
            else:
                lines.append(f"    server {r.name} {r.host}:{r.http_port} check{dns}")
    return lines + [""]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the configuration for replicas given as ``name=host[:http:grpc]``."""
    parser = argparse.ArgumentParser(prog="python -m sortformer_triton.proxy", description=__doc__.split("\n")[0])
    parser.add_argument("replicas", nargs="*", help="name=host or name=host:HTTP:GRPC")
    parser.add_argument("--discover", metavar="SERVICE", help="DNS SRV discovery of a headless Service instead")
    parser.add_argument("--max-replicas", type=int, default=8)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--stats-port", type=int, default=None)
    parser.add_argument("--balance", choices=BALANCES, default="affinity")
    args = parser.parse_args(argv)
    settings = ProxySettings(bind=args.bind, http_port=args.http_port, grpc_port=args.grpc_port,
                             stats_port=args.stats_port, balance=args.balance)
    if args.discover:
        target: Sequence[Replica] | Discovery = Discovery(args.discover, args.max_replicas)
    else:
        target = [_parse_replica(text) for text in args.replicas]
    sys.stdout.write(haproxy_config(target, settings))
    return 0


def _parse_replica(text: str) -> Replica:
    name, sep, rest = text.partition("=")
    if not sep:
        raise SystemExit(f"replica must be name=host[:http:grpc], got {text!r}")
    parts = rest.split(":")
    if len(parts) == 1:
        return Replica(name, parts[0])
    if len(parts) == 3:
        return Replica(name, parts[0], int(parts[1]), int(parts[2]))
    raise SystemExit(f"replica must be name=host[:http:grpc], got {text!r}")


if __name__ == "__main__":
    raise SystemExit(main())
