"""Helpers shared by the perf_analyzer runner, the locust runner and the report.

Paths (the repository root, the git-ignored ``results/``), a description of the machine a number was
measured on, random sequence-id bases, and ``serve()``: the gRPC address of a server, either one
already running (``--url``) or the embedded local tritonserver started for a repository.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import os
import platform
import secrets
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from sortformer_triton.presets import PRESETS, Preset, get_preset

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "results"  # git-ignored

# Sequence ids: Triton's CORRID is a uint64; keep clear of small "magic" ids other clients may use and
# of the top bit (some clients treat ids as signed).
SEQUENCE_ID_MIN = 1 << 40
SEQUENCE_ID_MAX = (1 << 62) - 1


def random_sequence_base(width: int, low: int = SEQUENCE_ID_MIN, high: int = SEQUENCE_ID_MAX) -> int:
    """A random first id of a block of ``width`` sequence ids inside [low, high]."""
    if width < 1 or high - low <= width:
        raise ValueError(f"cannot fit {width} ids in [{low}, {high}]")
    return low + secrets.randbelow(high - low - width)


def parse_presets(names: Optional[List[str]], default: str = "low") -> List[Preset]:
    """``--preset`` values (repeatable, comma lists allowed, ``all``) to presets, in preset order."""
    if not names:
        return [get_preset(default)]
    wanted: List[str] = []
    for item in names:
        for name in item.split(","):
            name = name.strip()
            if name == "all":
                wanted.extend(PRESETS)
            elif name:
                get_preset(name)  # a clear error for an unknown name
                wanted.append(name)
    return [PRESETS[n] for n in PRESETS if n in wanted]


def parse_int_list(text: str) -> List[int]:
    """``"1,2,4"`` or ``"1:8:2"`` (start:end:step, end included) to a list of positive ints."""
    text = text.strip()
    if ":" in text:
        parts = [int(p) for p in text.split(":")]
        start, end = parts[0], parts[1]
        step = parts[2] if len(parts) > 2 else 1
        values = list(range(start, end + 1, step))
    else:
        values = [int(p) for p in text.split(",") if p.strip()]
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def usable_cpus() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info() -> Dict[str, object]:
    """What a benchmark number depends on: CPUs, CPU model, OS, Python, date (UTC)."""
    return {
        "nproc": usable_cpus(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): recorded beside every measurement."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def results_dir(kind: str, out: Optional[Path] = None) -> Path:
    """``out`` or ``results/<kind>/``, created."""
    path = Path(out) if out is not None else RESULTS_ROOT / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where the server listens (``host:port``, no scheme). With ``--url`` both are that URL. ``pid``:
    the local tritonserver's process id when ``serve`` started it (None for ``--url``)."""

    grpc: str
    http: str
    pid: Optional[int] = None

    def for_protocol(self, protocol: str) -> str:
        return self.http if protocol == "http" else self.grpc


def replace_marked_section(path: Path, marker: str, section: str, title: str) -> Path:
    """Put ``section`` between ``<!-- BEGIN marker -->`` and ``<!-- END marker -->`` in the markdown file
    ``path``, replacing what was there (appended, and the file started with ``# title``, when missing):
    one benchmark run rewrites its own section of a document that holds several."""
    begin, end = f"<!-- BEGIN {marker} -->", f"<!-- END {marker} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else f"# {title}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def add_server_arguments(ap: argparse.ArgumentParser, url_help: str,
                         preset_help: str = "preset(s): repeatable, comma list or 'all' (default low)") -> None:
    """The options ``serve`` takes: a running server (--url) or a repository to serve locally, and the
    presets to drive."""
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help=url_help)
    where.add_argument("--model-repository", type=Path,
                       help="start the local tritonserver (nvidia-pytriton) on this repository, e.g. build/tiny/local")
    ap.add_argument("--preset", action="append", help=preset_help)


@contextlib.contextmanager
def serve(url: Optional[str], model_repository: Optional[Path],
          log_path: Optional[Path] = None) -> Iterator[Endpoint]:
    """Yield the server's endpoint: ``url`` as given, or a local tritonserver started for
    ``model_repository`` (the nvidia-pytriton wheel's server; stopped on exit)."""
    if (url is None) == (model_repository is None):
        raise ValueError("give exactly one of --url (a running server) or --model-repository")
    if url is not None:
        yield Endpoint(url, url)
        return
    from sortformer_triton.local_server import LocalTritonServer

    server = LocalTritonServer(Path(model_repository), log_path=log_path)
    server.start()
    print(f"local tritonserver ready in {server.start_seconds:.1f} s: gRPC {server.grpc_url} "
          f"(repository {server.model_repository}, log {server.log_path})", flush=True)
    try:
        yield Endpoint(server.grpc_url, server.http_url, server.pid)
    finally:
        server.stop()
