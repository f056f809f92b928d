"""N local tritonservers behind one HAProxy with sequence affinity, all on 127.0.0.1.

The local twin of the compose profile ``replicas`` and the Kubernetes tree in ``deploy/k8s``: the same
proxy configuration (``sortformer_triton.proxy``) in front of ``LocalTritonServer`` replicas serving one
model repository. Clients use the proxy's URLs as they would one server's.

- every replica runs with the same admin and HTTP inference keys, so a client's key works whichever
  replica the proxy picks;
- ``kill(i)`` kills replica ``i`` hard (its streams fail with ``ServerUnavailable``), ``restart(i)``
  brings it back on the same ports; both wait until the proxy's health checks agree;
- ``replica_of(sequence_id)`` reads the proxy's stick table: which replica holds a sequence.

Use it as a context manager in tests, or ``python -m sortformer_triton.replicas --model-repository DIR``
in a terminal (HAProxy from Debian's ``haproxy`` package; scripts/setup.sh installs it).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Dict, List, Optional, Sequence, Type

from . import server_flags
from .local_server import (
    LOOPBACK,
    LocalTritonServer,
    TritonServerError,
    _die_with_parent,
    free_port,
    log_tail,
    raise_keyboard_interrupt,
    reap_process_group,
)
from .proxy import BALANCES, GRPC_BACKEND, HTTP_BACKEND, ProxySettings, Replica, haproxy_config

DEFAULT_PROXY_READY_TIMEOUT_S = 30.0
CHECK_INTERVAL_MS = 200  # local health checks: a killed replica leaves the choice within ~0.4 s


class ProxyError(TritonServerError):
    """HAProxy could not be found, configured or started, or its runtime API did not answer."""


def find_haproxy() -> str:
    path = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None)
    if path is None:
        raise ProxyError("haproxy not found: install Debian's haproxy package (scripts/setup.sh does)")
    return path


class LocalReplicaSet:
    """``replicas`` tritonservers on free loopback ports behind HAProxy on ``http_port``/``grpc_port``
    (free ports when not given). ``balance="round_robin"`` turns affinity off (demonstrations only)."""

    def __init__(self, model_repository: os.PathLike | str, replicas: int = 2,
                 http_port: Optional[int] = None, grpc_port: Optional[int] = None,
                 balance: str = "affinity", work_dir: Optional[os.PathLike | str] = None,
                 server_options: Optional[Dict[str, object]] = None) -> None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        self.model_repository = Path(model_repository).resolve()
        self.count = replicas
        self.balance = balance
        self._requested = (http_port, grpc_port)
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="replicas-"))
        self.admin_key = server_flags.admin_key()
        self.http_inference_key = server_flags.http_inference_key()
        self._server_options = dict(server_options or {})
        self.servers: List[LocalTritonServer] = []
        self._ports: List[tuple] = []
        self._proxy: Optional[subprocess.Popen[bytes]] = None
        self.http_port = 0
        self.grpc_port = 0

    # ---- addresses ------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_inference_headers(self) -> Dict[str, str]:
        return server_flags.http_inference_headers(self.http_inference_key)

    @property
    def names(self) -> List[str]:
        return [f"replica{i}" for i in range(self.count)]

    @property
    def proxy_running(self) -> bool:
        return self._proxy is not None and self._proxy.poll() is None

    @property
    def socket_path(self) -> Path:
        return self.work_dir / "haproxy.sock"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "haproxy.cfg"

    @property
    def proxy_log(self) -> Path:
        return self.work_dir / "haproxy.log"

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "LocalReplicaSet":
        haproxy = find_haproxy()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._ports = [(free_port(), free_port(), free_port()) for _ in range(self.count)]
        self.servers = [self._server(i) for i in range(self.count)]
        try:
            # the replicas load their models in parallel (each one's start blocks until it is ready)
            with concurrent.futures.ThreadPoolExecutor(self.count) as pool:
                for future in [pool.submit(s.start) for s in self.servers]:
                    future.result()
            self.http_port = self._requested[0] or free_port()
            self.grpc_port = self._requested[1] or free_port()
            self._start_proxy(haproxy)
            self.wait_until(lambda states: all(v == "UP" for v in states.values()), "every replica UP")
        except BaseException:
            self.stop()
            raise
        return self

    def _server(self, i: int) -> LocalTritonServer:
        http, grpc, metrics = self._ports[i]
        return LocalTritonServer(
            self.model_repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
            log_path=self.work_dir / f"{self.names[i]}.log", admin_key=self.admin_key,
            http_inference_key=self.http_inference_key, kill_with_parent=False, **self._server_options)  # type: ignore[arg-type]

    def replicas(self) -> List[Replica]:
        return [Replica(name, LOOPBACK, *ports) for name, ports in zip(self.names, self._ports)]

    def _start_proxy(self, haproxy: str) -> None:
        settings = ProxySettings(http_port=self.http_port, grpc_port=self.grpc_port, balance=self.balance,
                                 stats_socket=str(self.socket_path), check_interval_ms=CHECK_INTERVAL_MS,
                                 check_fall=1, check_rise=1)
        self.config_path.write_text(haproxy_config(self.replicas(), settings))
        check = subprocess.run([haproxy, "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise ProxyError(f"haproxy refused {self.config_path}:\n{check.stdout}{check.stderr}")
        with open(self.proxy_log, "ab") as log:
            self._proxy = subprocess.Popen([haproxy, "-db", "-f", str(self.config_path)], stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           preexec_fn=_die_with_parent)
        deadline = time.monotonic() + DEFAULT_PROXY_READY_TIMEOUT_S
        while not self.socket_path.exists() or not self._answers():
            if self._proxy.poll() is not None:
                raise ProxyError(f"haproxy exited with code {self._proxy.returncode}:\n{log_tail(self.proxy_log)}")
            if time.monotonic() > deadline:
                raise ProxyError(f"haproxy's runtime API did not answer in {DEFAULT_PROXY_READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            self.command("show info")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the proxy and every replica (graceful, then hard); nothing of them outlives ``stop``."""
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            if proxy.poll() is None:
                proxy.terminate()
                try:
                    proxy.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proxy.kill()
                    proxy.wait()
            reap_process_group(proxy.pid)
        errors = []
        for server in self.servers:
            try:
                server.stop()
            except TritonServerError as exc:
                errors.append(str(exc))
        if self._own_dir and not errors:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if errors:
            raise TritonServerError("; ".join(errors))

    def kill(self, index: int) -> None:
        """SIGKILL replica ``index`` and its Python stubs (a crash), then wait until the proxy marks it DOWN."""
        server = self.servers[index]
        pid = server.pid
        if pid is None:
            raise TritonServerError(f"{self.names[index]} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        server.stop()  # reaps the process group; the exit code is -9
        self.wait_until(lambda states: states[self.names[index]] != "UP", f"{self.names[index]} DOWN")

    def restart(self, index: int) -> None:
        """Start replica ``index`` again on its ports and wait until the proxy marks it UP."""
        if self.servers[index].running:
            raise TritonServerError(f"{self.names[index]} is still running")
        self.servers[index] = self._server(index)
        self.servers[index].start()
        self.wait_until(lambda states: states[self.names[index]] == "UP", f"{self.names[index]} UP")

    def __enter__(self) -> "LocalReplicaSet":
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()

    # ---- the proxy's runtime API ----------------------------------------------------------------
    def command(self, text: str) -> str:
        """One HAProxy runtime API command over the stats socket; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.socket_path))
            sock.sendall(text.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self, backend: str = GRPC_BACKEND) -> Dict[str, str]:
        """Each replica's health as the proxy sees it in ``backend`` (``UP``, ``DOWN``, ...)."""
        rows = csv.DictReader(io.StringIO(self.command("show stat").lstrip("# ")))
        return {row["svname"]: row["status"].split()[0] for row in rows
                if row["pxname"] == backend and row["svname"] in self.names}

    def wait_until(self, predicate, what: str, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while True:
            states, grpc = self.states(HTTP_BACKEND), self.states(GRPC_BACKEND)
            if predicate(states) and predicate(grpc):
                return
            if time.monotonic() > deadline:
                raise ProxyError(f"the proxy did not see {what} within {timeout_s:g} s: http {states}, grpc {grpc}")
            time.sleep(0.05)

    def replica_of(self, sequence_id: int, backend: str = GRPC_BACKEND) -> Optional[str]:
        """The replica the proxy sends sequence ``sequence_id`` to (None: it has no entry)."""
        answer = self.command(f"show table {backend} key {int(sequence_id)}")
        for line in answer.splitlines():
            for field in line.split():
                if field.startswith("server_id="):
                    index = int(field.split("=", 1)[1]) - 1  # HAProxy numbers servers from 1
                    return self.names[index] if 0 <= index < self.count else None
        return None

    def __repr__(self) -> str:
        return f"LocalReplicaSet({str(self.model_repository)!r}, {self.count} replicas, grpc {self.grpc_url})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sortformer_triton.replicas",
                                     description="N local tritonservers behind HAProxy with sequence affinity.")
    parser.add_argument("--model-repository", required=True, type=Path)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--http-port", type=int, default=8000, help="the proxy's HTTP port (0 = any free port)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="the proxy's gRPC port (0 = any free port)")
    parser.add_argument("--balance", choices=BALANCES, default="affinity")
    args = parser.parse_args(argv)
    replica_set = LocalReplicaSet(args.model_repository, args.replicas, args.http_port or None,
                                  args.grpc_port or None, args.balance)
    try:
        replica_set.start()
    except TritonServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.replicas} replicas ready behind HAProxy ({args.balance})", flush=True)
    print(f"  HTTP  {replica_set.http_url}   gRPC  {replica_set.grpc_url}", flush=True)
    for server, name in zip(replica_set.servers, replica_set.names):
        print(f"  {name}: gRPC {server.grpc_url}, metrics {server.metrics_url}, log {server.log_path}", flush=True)
    print(f"  proxy config {replica_set.config_path}, runtime API {replica_set.socket_path}", flush=True)
    print("Ctrl-C to stop.", flush=True)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        while replica_set.proxy_running:
            time.sleep(0.5)
        print(f"haproxy exited; log {replica_set.proxy_log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        replica_set.stop()


if __name__ == "__main__":
    sys.exit(main())
