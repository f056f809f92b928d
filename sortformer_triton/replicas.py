"""N local tritonservers behind one HAProxy with sequence affinity, all on 127.0.0.1.

The local twin of the compose profile ``replicas`` and the Kubernetes tree in ``deploy/k8s``: the same
proxy configuration (``sortformer_triton.proxy``) in front of ``LocalTritonServer`` replicas serving one
model repository. Clients use the proxy's URLs as they would one server's.

- every replica runs with the same admin and HTTP inference keys, so a client's key works whichever
  replica the proxy picks;
- ``kill(i)`` kills replica ``i`` hard (its streams fail with ``ServerUnavailable``), ``restart(i)``
  brings it back on the same ports; both wait until the proxy's health checks agree;
- ``proxy.replica_of(sequence_id)`` reads the proxy's stick table: which replica holds a sequence.

Use it as a context manager in tests, or ``python -m sortformer_triton.replicas --model-repository DIR``
in a terminal (HAProxy from Debian's ``haproxy`` package; scripts/setup.sh installs it).
"""
from __future__ import annotations

import argparse
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

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
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if path is None:
        raise ProxyError("haproxy not found: install Debian's haproxy package (scripts/setup.sh does)")
    return path


class LocalProxy:
    """HAProxy as a child process in front of ``replicas`` (``sortformer_triton.proxy``'s configuration),
    on loopback ports (free ones when not given), with its runtime API on a Unix socket in ``work_dir``."""

    def __init__(self, replicas: Sequence[Replica], work_dir: os.PathLike | str, http_port: Optional[int] = None,
                 grpc_port: Optional[int] = None, balance: str = "affinity", name: str = "haproxy") -> None:
        self.replicas = list(replicas)
        self.work_dir = Path(work_dir).resolve()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.settings = ProxySettings(http_port=self.http_port, grpc_port=self.grpc_port, balance=balance,
                                      stats_socket=str(self.work_dir / f"{name}.sock"),
                                      check_interval_ms=CHECK_INTERVAL_MS, check_fall=1, check_rise=1)
        self.config_path = self.work_dir / f"{name}.cfg"
        self.log_path = self.work_dir / f"{name}.log"
        self._process: Optional[subprocess.Popen[bytes]] = None

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def names(self) -> List[str]:
        return [r.name for r in self.replicas]

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> "LocalProxy":
        haproxy = find_haproxy()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(haproxy_config(self.replicas, self.settings))
        check = subprocess.run([haproxy, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise ProxyError(f"haproxy refused {self.config_path}:\n{check.stdout}{check.stderr}")
        socket_path = Path(str(self.settings.stats_socket))
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen([haproxy, "-db", "-f", str(self.config_path)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=_die_with_parent)
        deadline = time.monotonic() + DEFAULT_PROXY_READY_TIMEOUT_S
        while not socket_path.exists() or not self._answers():
            if self._process.poll() is not None:
                raise ProxyError(f"haproxy exited with code {self._process.returncode}:\n{log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise ProxyError(f"haproxy's runtime API did not answer in {DEFAULT_PROXY_READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            self.command("show info")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reap_process_group(process.pid)

    def __enter__(self) -> "LocalProxy":
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()

    # ---- the runtime API ------------------------------------------------------------------------
    def command(self, text: str) -> str:
        """One HAProxy runtime API command over the stats socket; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.settings.stats_socket))
            sock.sendall(text.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self, backend: str = GRPC_BACKEND) -> Dict[str, str]:
        """Each replica's health as the proxy sees it in ``backend`` (``UP``, ``DOWN``, ``MAINT`` ...; a
        replica whose checks are off is ``UP``: the proxy sends it requests)."""
        rows = csv.DictReader(io.StringIO(self.command("show stat").lstrip("# ")))
        return {row["svname"]: "UP" if row["status"] == "no check" else row["status"].split()[0] for row in rows
                if row["pxname"] == backend and row["svname"] in self.names}

    def wait_until(self, predicate: Callable[[Dict[str, str]], bool], what: str, timeout_s: float = 20.0) -> None:
        """Until ``predicate`` holds for the replicas' states in both the HTTP and the gRPC backend."""
        deadline = time.monotonic() + timeout_s
        while True:
            http, grpc = self.states(HTTP_BACKEND), self.states(GRPC_BACKEND)
            if predicate(http) and predicate(grpc):
                return
            if time.monotonic() > deadline:
                raise ProxyError(f"the proxy did not see {what} within {timeout_s:g} s: http {http}, grpc {grpc}")
            time.sleep(0.05)

    def placements(self, backend: str = GRPC_BACKEND, sequence_id: Optional[int] = None) -> Dict[int, str]:
        """The stick table of ``backend`` (only ``sequence_id``'s entry, when given): sequence id -> replica."""
        command = f"show table {backend}" + (f" key {int(sequence_id)}" if sequence_id is not None else "")
        placed: Dict[int, str] = {}
        for line in self.command(command).splitlines():  # "0x..: key=123 use=0 exp=.. server_id=1 ..."
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "key" in fields and "server_id" in fields:
                index = int(fields["server_id"]) - 1  # HAProxy numbers a backend's servers from 1
                if 0 <= index < len(self.names):
                    placed[int(fields["key"])] = self.names[index]
        return placed

    def replica_of(self, sequence_id: int, backend: str = GRPC_BACKEND) -> Optional[str]:
        """The replica the proxy sends sequence ``sequence_id`` to in ``backend`` (None: no entry)."""
        return self.placements(backend, sequence_id).get(int(sequence_id))

    def set_checks(self, replica: str, enabled: bool) -> None:
        """Turn the health checks of ``replica`` off (the proxy keeps its last state) or on, in every backend."""
        for backend in (GRPC_BACKEND, HTTP_BACKEND):
            self.command(f"{'enable' if enabled else 'disable'} health {backend}/{replica}")


class LocalReplicaSet:
    """``replicas`` tritonservers on free loopback ports behind a :class:`LocalProxy` on ``http_port`` /
    ``grpc_port`` (free ports when not given). ``balance="round_robin"`` turns affinity off
    (demonstrations only)."""

    def __init__(self, model_repository: os.PathLike | str, replicas: int = 2,
                 http_port: Optional[int] = None, grpc_port: Optional[int] = None,
                 balance: str = "affinity", work_dir: Optional[os.PathLike | str] = None) -> None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        self.model_repository = Path(model_repository).resolve()
        self.count = replicas
        self.balance = balance
        self._requested = (http_port, grpc_port)
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir if work_dir is not None else tempfile.mkdtemp(prefix="replicas-")).resolve()
        # one key for all: a client's key works whichever replica its sequence lands on
        self.admin_key = server_flags.admin_key()
        self.http_inference_key = server_flags.http_inference_key()
        self.servers: List[LocalTritonServer] = []
        self._ports: List[Tuple[int, int, int]] = []
        self.proxy: Optional[LocalProxy] = None

    @property
    def names(self) -> List[str]:
        return [f"replica{i}" for i in range(self.count)]

    @property
    def http_url(self) -> str:
        return self._proxy().http_url

    @property
    def grpc_url(self) -> str:
        return self._proxy().grpc_url

    def _proxy(self) -> LocalProxy:
        if self.proxy is None:
            raise TritonServerError("the replica set has not been started")
        return self.proxy

    def replicas(self) -> List[Replica]:
        return [Replica(name, LOOPBACK, http, grpc) for name, (http, grpc, _) in zip(self.names, self._ports)]

    def start(self) -> "LocalReplicaSet":
        find_haproxy()  # before minutes of model loading
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._ports = [(free_port(), free_port(), free_port()) for _ in range(self.count)]
        self.servers = [self._server(i) for i in range(self.count)]
        try:
            # one after the other, from this thread: the kernel kills each server when the thread that
            # started it ends (kill_with_parent), so a crashed caller leaves no replica behind
            for server in self.servers:
                server.start()
            self.proxy = LocalProxy(self.replicas(), self.work_dir, *self._requested, balance=self.balance).start()
            self.proxy.wait_until(lambda states: all(v == "UP" for v in states.values()), "every replica UP")
        except BaseException:
            self.stop()
            raise
        return self

    def _server(self, i: int) -> LocalTritonServer:
        http, grpc, metrics = self._ports[i]
        return LocalTritonServer(
            self.model_repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
            log_path=self.work_dir / f"{self.names[i]}.log", admin_key=self.admin_key,
            http_inference_key=self.http_inference_key)

    def stop(self) -> None:
        """Stop the proxy and every replica; nothing of them outlives ``stop``."""
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            proxy.stop()
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

    def kill(self, index: int, wait: bool = True) -> None:
        """SIGKILL replica ``index`` and its Python stubs (a crash); with ``wait``, until the proxy marks it DOWN."""
        server = self.servers[index]
        if server.pid is None:
            raise TritonServerError(f"{self.names[index]} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.stop()  # reaps the process group
        if wait:
            self._proxy().wait_until(lambda states: states[self.names[index]] != "UP", f"{self.names[index]} DOWN")

    def restart(self, index: int) -> None:
        """Start replica ``index`` again on its ports and wait until the proxy marks it UP."""
        if self.servers[index].running:
            raise TritonServerError(f"{self.names[index]} is still running")
        self.servers[index] = self._server(index)
        self.servers[index].start()
        self._proxy().wait_until(lambda states: states[self.names[index]] == "UP", f"{self.names[index]} UP")

    def __enter__(self) -> "LocalReplicaSet":
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"grpc {self.grpc_url}" if self.proxy is not None else "stopped"
        return f"LocalReplicaSet({str(self.model_repository)!r}, {self.count} replicas, {state})"


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
    proxy = replica_set._proxy()
    print(f"  proxy config {proxy.config_path}, log {proxy.log_path}, runtime API {proxy.settings.stats_socket}",
          flush=True)
    print("Ctrl-C to stop.", flush=True)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        while proxy.running:
            time.sleep(0.5)
        print(f"haproxy exited; log {proxy.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        replica_set.stop()


if __name__ == "__main__":
    sys.exit(main())
