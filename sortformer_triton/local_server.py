"""Run the real ``tritonserver`` 2.51 shipped in the ``nvidia-pytriton`` wheel, without docker.

The wheel's server has only the Python backend (see docs in notes/platform.md), so the local model
repository runs the stateful ONNX graphs inside Python-backend models. This module hides the recipe
that makes that server work from a plain virtual environment:

- the Python backend stub for this interpreter is copied into ``backends/python`` (the wheel ships
  one stub per Python version beside the backend, not in it);
- the environment's ``bin`` comes first on ``PATH`` (the stub's interpreter finds numpy there),
  ``LD_LIBRARY_PATH`` points at this interpreter's ``libpython`` and ``PYTHONPATH`` at the repository
  root, so Python models can ``import sortformer_triton``;
- every endpoint listens on 127.0.0.1 only, with free ports unless given.

Use :class:`LocalTritonServer` as a context manager in tests, or ``python -m
sortformer_triton.local_server --model-repository DIR`` in a terminal.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Dict, List, Mapping, Optional, Sequence, Type

from . import server_flags

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
DEFAULT_READY_TIMEOUT_S = 120.0
DEFAULT_STOP_TIMEOUT_S = 20.0  # the server itself waits --exit-timeout-secs=10 for open sequences
REAP_TIMEOUT_S = 10.0  # after the server exited: how long its process group's leftovers may take to die
LOG_TAIL_CHARS = 4000


class TritonServerError(RuntimeError):
    """The local tritonserver could not be found, started or made ready."""


@dataclasses.dataclass(frozen=True)
class TritonPaths:
    """Where the wheel's tritonserver lives (``<site-packages>/pytriton/tritonserver``)."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def caches(self) -> Path:
        return self.root / "caches"

    @property
    def python_stub(self) -> Path:
        return self.backends / "python" / "triton_python_backend_stub"


def _python_version_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_tritonserver() -> TritonPaths:
    """Locate the wheel's tritonserver in this interpreter's environment and install the stub.

    The Python backend starts ``backends/python/triton_python_backend_stub``; the wheel only ships
    it under ``python_backend_stubs/<python version>/``, so it is copied once (idempotent).
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "the nvidia-pytriton wheel is not installed in this environment "
            f"({sys.executable}); pip install 'nvidia-pytriton==0.7.0'"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    paths = TritonPaths(root)
    if not paths.binary.is_file():
        raise TritonServerError(f"no tritonserver binary at {paths.binary}")
    if not paths.python_stub.is_file():
        stub = root / "python_backend_stubs" / _python_version_tag() / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonServerError(
                f"the wheel has no Python backend stub for Python {_python_version_tag()} ({stub})"
            )
        paths.python_stub.parent.mkdir(parents=True, exist_ok=True)
        tmp = paths.python_stub.with_suffix(".tmp%d" % os.getpid())
        shutil.copy2(stub, tmp)
        os.replace(tmp, paths.python_stub)  # atomic: concurrent test processes may race here
    return paths


def free_port() -> int:
    """A TCP port free on the loopback right now (the OS picks it; a race is retried by start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def server_environment(base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for tritonserver and the Python stubs it spawns (they inherit it).

    - ``PATH``: this environment's ``bin`` first, or Python models fail with "No module named numpy";
    - ``LD_LIBRARY_PATH``: this interpreter's LIBDIR, so the stub loads the matching libpython;
    - ``PYTHONPATH``: the repository root, so ``model.py`` files can import ``sortformer_triton``.
    """
    env = dict(os.environ if base is None else base)
    scripts = sysconfig.get_paths()["scripts"]
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["PATH"] = _prepend(scripts, env.get("PATH"))
    env["LD_LIBRARY_PATH"] = _prepend(libdir, env.get("LD_LIBRARY_PATH"))
    env["PYTHONPATH"] = _prepend(str(REPO_ROOT), env.get("PYTHONPATH"))
    return env


def _prepend(entry: str, current: Optional[str]) -> str:
    parts = [p for p in (current or "").split(os.pathsep) if p and p != entry]
    return os.pathsep.join([entry, *parts]) if entry else os.pathsep.join(parts)


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the parent dies, so a crashed test run leaves no server."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def process_group_members(pgid: int) -> List[int]:
    """Live (not zombie) processes of process group ``pgid`` (from /proc; [] where there is no /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def reap_process_group(pgid: int, timeout_s: float = REAP_TIMEOUT_S) -> List[int]:
    """SIGKILL whatever is left of process group ``pgid`` (a server's Python stubs outlive a crashed or
    killed tritonserver) and wait until none of it runs; returns the pids still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = process_group_members(pgid)
        if not alive or time.monotonic() > deadline:
            return alive
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.05)


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log file ('' when there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - chars, 0))
            return fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def error_lines(path: Path, limit: int = 20) -> str:
    """Triton's error-level lines (``E1123 ...``) and model load failures, which the status tables
    printed at exit push out of the log's tail."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    pattern = re.compile(r"^E\d{4} |UNAVAILABLE|error:", re.IGNORECASE)
    lines = [line for line in text.splitlines() if pattern.search(line)]
    return "\n".join(lines[-limit:])


class LocalTritonServer:
    """The wheel's tritonserver as a child process serving one model repository on loopback.

    Runs with ``server_flags.safe_flags``: ``model_control_mode=none`` (every model in the repository is
    loaded at start), ready (``strict_readiness``) only when all of them are, the admin APIs (model
    repository, shared memory, logging, trace) restricted to requests with the header
    ``triton-admin-key: <admin_key>``, HTTP inference to requests with ``triton-inference-key:
    <http_inference_key>`` (gRPC inference is open). Ports are picked free when not given.
    ``kill_with_parent`` makes the kernel kill the server when the thread that started it exits
    (keep it on in tests; turn it off when starting from a short-lived thread).

    URLs are ``host:port`` without a scheme, as ``tritonclient`` expects them.
    """

    def __init__(
        self,
        model_repository: os.PathLike | str,
        http_port: Optional[int] = None,
        grpc_port: Optional[int] = None,
        metrics_port: Optional[int] = None,
        log_path: Optional[os.PathLike | str] = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
        kill_with_parent: bool = True,
        admin_key: Optional[str] = None,
        http_inference_key: Optional[str] = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        # restricted admin APIs (server_flags): the key from the argument or the environment, else random
        self.admin_key = admin_key or server_flags.admin_key()
        # HTTP inference needs this key (server_flags: Triton 2.51's HTTP JSON path can be crashed)
        self.http_inference_key = http_inference_key or server_flags.http_inference_key()
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self._ports = (0, 0, 0)
        self._log_path = Path(log_path).resolve() if log_path is not None else None
        self._own_log_dir: Optional[Path] = None  # a temp dir we made (mkdtemp: kept on failure)
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self._extra_env = dict(env or {})
        self.kill_with_parent = kill_with_parent
        self._process: Optional[subprocess.Popen[bytes]] = None
        self.start_seconds: Optional[float] = None

    # ---- properties -----------------------------------------------------------------------------
    @property
    def http_port(self) -> int:
        return self._ports[0]

    @property
    def grpc_port(self) -> int:
        return self._ports[1]

    @property
    def metrics_port(self) -> int:
        return self._ports[2]

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def http_inference_headers(self) -> Dict[str, str]:
        """The header HTTP inference requests to this server need."""
        return server_flags.http_inference_headers(self.http_inference_key)

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise TritonServerError("the server has not been started: no log yet")
        return self._log_path

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "LocalTritonServer":
        """Start the server and wait until it is ready; retry on a lost race for a free port."""
        if self.running:
            return self
        paths = find_tritonserver()
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        if self._log_path is None:
            self._own_log_dir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
            self._log_path = self._own_log_dir / "tritonserver.log"
        auto_ports = any(p is None for p in self._requested_ports)
        attempts = 3 if auto_ports else 1
        t0 = time.monotonic()
        for attempt in range(attempts):
            self._ports = tuple(p if p is not None else free_port() for p in self._requested_ports)  # type: ignore[assignment]
            self._spawn(paths)
            try:
                self._wait_ready()
                self.start_seconds = time.monotonic() - t0
                return self
            except TritonServerError:
                tail = log_tail(self.log_path)
                self._terminate()
                port_clash = "address already in use" in tail.lower()
                if not (port_clash and attempt + 1 < attempts):
                    raise
        raise AssertionError("unreachable")

    def _command(self, paths: TritonPaths) -> List[str]:
        # the safe flags the compose entrypoint adds too, by the same function (refuses extra_args clashing)
        return server_flags.command([
            str(paths.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={paths.backends}",
            f"--cache-directory={paths.caches}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.http_port}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ], self.admin_key, self.http_inference_key)

    def _spawn(self, paths: TritonPaths) -> None:
        env = server_environment()
        env.update(self._extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self._command(paths)
        with open(self.log_path, "ab") as log:
            shown = " ".join(command).replace(self.admin_key, "<admin key>")
            shown = shown.replace(self.http_inference_key, "<http inference key>")
            log.write(f"\n==== {shown}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.model_repository),
                # own session: a terminal's Ctrl-C reaches only us, and we stop the server once
                start_new_session=True,
                preexec_fn=_die_with_parent if self.kill_with_parent else None,
            )

    def _wait_ready(self) -> None:
        """Poll HTTP readiness; fail early when the process dies, with the log's tail."""
        import tritonclient.http as httpclient  # imported here: the module itself needs no client

        deadline = time.monotonic() + self.ready_timeout_s
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=2.0)
        try:
            while True:
                assert self._process is not None
                code = self._process.poll()
                if code is not None:
                    raise self._error(f"tritonserver exited with code {code} before it was ready")
                with contextlib.suppress(Exception):
                    if client.is_server_ready():
                        return
                if time.monotonic() > deadline:
                    raise self._error(f"tritonserver not ready after {self.ready_timeout_s:.0f} s")
                time.sleep(0.1)
        finally:
            client.close()

    def _error(self, what: str) -> TritonServerError:
        errors = error_lines(self.log_path)
        return TritonServerError(
            f"{what} (repository {self.model_repository}, log {self.log_path})"
            + (f"; errors:\n{errors}" if errors else "")
            + f"\nlog tail:\n{log_tail(self.log_path)}"
        )

    def stop(self) -> Optional[int]:
        """Stop the server: SIGINT (graceful, unloads models), SIGKILL after ``stop_timeout_s``; then
        every process left in its process group (its Python stubs, also after the server was killed or
        crashed) is killed and waited for, so nothing of it outlives ``stop``."""
        code = self._terminate()
        if self._own_log_dir is not None and code == 0:
            # keep a failing server's log for post-mortem; drop a clean one
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
            self._own_log_dir = None
            self._log_path = None
        return code

    def _terminate(self) -> Optional[int]:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # start_new_session: the server leads its own process group, which its Python stubs share
        left = reap_process_group(process.pid)
        if left:
            raise TritonServerError(f"processes {left} of tritonserver's group {process.pid} survived SIGKILL")
        return process.returncode

    def wait(self) -> int:
        """Block until the server exits by itself; its exit code."""
        if self._process is None:
            raise TritonServerError("the server is not running")
        return self._process.wait()

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}, http {self.http_url}, grpc {self.grpc_url}" if self.running else "stopped"
        return f"LocalTritonServer({str(self.model_repository)!r}, {state})"


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """A signal handler (for SIGTERM) that takes the Ctrl-C path."""
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve a model repository in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m sortformer_triton.local_server",
        description="Run the nvidia-pytriton wheel's tritonserver (Python backend only) on 127.0.0.1.",
    )
    parser.add_argument("--model-repository", required=True, type=Path)
    parser.add_argument("--http-port", type=int, default=8000, help="0 = any free port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 = any free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 = any free port")
    parser.add_argument("--log-path", type=Path, default=None, help="server log (default: a temp file)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S)
    args = parser.parse_args(argv)

    server = LocalTritonServer(
        args.model_repository,
        http_port=args.http_port or None,
        grpc_port=args.grpc_port or None,
        metrics_port=args.metrics_port or None,
        log_path=args.log_path,
        ready_timeout_s=args.ready_timeout,
        log_verbose=args.log_verbose,
    )
    try:
        server.start()
    except TritonServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"tritonserver ready in {server.start_seconds:.1f} s (pid {server.pid})", flush=True)
    print(f"  HTTP    {server.http_url} (inference only with the header {server_flags.HTTP_INFERENCE_HEADER}: "
          f"${server_flags.HTTP_INFERENCE_KEY_ENV}" + ("" if os.environ.get(server_flags.HTTP_INFERENCE_KEY_ENV)
                                                       else ", unset: closed") + ")", flush=True)
    print(f"  gRPC    {server.grpc_url}", flush=True)
    print(f"  metrics {server.metrics_url}", flush=True)
    print(f"  log     {server.log_path}", flush=True)
    print("Ctrl-C to stop.", flush=True)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # docker/systemd stop: same clean path
    try:
        code = server.wait()
        print(f"tritonserver exited with code {code}; log {server.log_path}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        return 0 if server.stop() in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
