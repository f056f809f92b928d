"""One long stream, unpaced: does step time or memory grow with the age of a stream?

    python -m loadtest.long_stream --model-repository build/full_long/local --preset very_high --minutes 120 \\
        --markdown docs/long_streams.md --plot docs/long_streams_very_high.png
    python -m loadtest.long_stream --url 127.0.0.1:8001 --server-pid 4242 --preset low --minutes 30

A stream's server-side state is fixed-size by design (speaker cache, FIFO, the postprocessor's
unfinalized tail), so neither the step time nor the memory of the server may grow with the stream's
age. This tool streams one long synthetic conversation through the client library as fast as the
server answers (one request in flight, no pacing) and records:

- per request: the step latency (request sent -> response received, the client library's
  ``Update.latency_s``) and the CPU time the server's processes spent meanwhile (utime + stime from
  ``/proc/<pid>/stat``, summed over the tree). On a shared machine both follow the load of other
  processes (the latency fully; the CPU time less: ONNX Runtime's threads spin while they wait for
  each other), so the ratios are also given over the longest stretch of steady machine load;
- every ``--rss-every`` requests (and right after the warm-up and at the end): the resident memory
  (``VmRSS``, and its anonymous part ``RssAnon``, from ``/proc/<pid>/status``) of every process of
  the server's tree (tritonserver and its Python-backend stub processes, one per model instance) and of
  this client process, and the 1-min load average;
- Triton's own per-model statistics (queue and compute time per execution) over the first and the last
  10 % of the stream and after the warm-up.

The audio is made lazily: ``--piece-seconds`` pieces of a 4-speaker conversation
(``sortformer_triton.samples.conversation``, seed ``--seed + k`` for piece ``k``; the same 4 voices
throughout, like a long meeting), generated when the stream needs them and fed one step at a time, so
the client holds one piece (60 s = 3.8 MB) at a time, never the whole recording. Synthesis runs between
requests (never during one), so it does not disturb the step times; it is reported apart.

Figures of the run (printed, ``summary.json``, and with ``--markdown`` a section of that file between
``<!-- BEGIN long_stream:<label> -->`` markers; ``--plot`` a PNG of step time, RSS and load against
stream time): step-time and server-CPU-per-step medians of the first vs the last 10 % of the audio
steps (ratio), p50/p95/max,
least-squares trends after the warm-up, RSS after the warm-up / max / end and the growth, the real-time
factor, and the stream's end: every frame confirmed (== NeMo's whole-file count), FINISHED, segment
count. Raw data: ``steps.csv`` and ``rss.csv`` in ``--out`` (default ``results/long_stream/<label>``);
``--render DIR [--markdown F] [--plot P]`` redoes the plot and markdown of a run without measuring.
With ``--url`` the server's memory and CPU are measured only when ``--server-pid`` is given.

The warm-up is the requests until the speaker cache and FIFO are full and the first chunk after that
is confirmed (``warmup_requests``; at least ``--warmup-requests``): from then on every step runs the
same branches of the cache update at the same fixed shapes. The exit status is 1 when the stream did
not end with every frame confirmed; growth is reported, never turned into a failure (a benchmark on a
shared machine, not a test). Ctrl-C (or SIGTERM) stops early: the stream is ended with END and the
figures of the part streamed are still written, marked interrupted (exit status 130).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from clients.sortformer_client import PROTOCOLS
from sortformer_triton.local_server import raise_keyboard_interrupt
from sortformer_triton.presets import SAMPLE_RATE, Preset, requests_for
from sortformer_triton.protocol import expected_frames
from sortformer_triton.samples import conversation

from .common import (REPO_ROOT, add_server_arguments, load_average, machine_info, parse_presets,
                     replace_marked_section, results_dir, serve)

MB = 1024.0 * 1024.0
DEFAULT_PIECE_SECONDS = 60.0
DEFAULT_SPEAKERS = 4
RSS_SAMPLES_TARGET = 300  # default --rss-every: about this many samples per run
WINDOW_FRACTION = 0.10  # first / last 10 % of the audio steps
# "bounded" verdicts (stated in the report; a shared 2-CPU machine has ~20 % noise on step times)
STEP_RATIO_BOUND = 1.25
RSS_GROWTH_BOUND_MB = 20.0
RSS_GROWTH_BOUND_FRACTION = 0.05


# ---- audio ----------------------------------------------------------------------------------------
class SyntheticLongAudio:
    """``total_samples`` of 16 kHz audio made on demand from ``piece_seconds`` conversation pieces.

    Piece ``k`` is ``conversation(piece_seconds, n_speakers, seed=seed + k)`` (the last one cut to
    the total). Only the piece being fed is held. ``synthesis_s`` accumulates the time spent making them.
    """

    def __init__(self, total_samples: int, piece_seconds: float = DEFAULT_PIECE_SECONDS,
                 n_speakers: int = DEFAULT_SPEAKERS, seed: int = 0) -> None:
        if total_samples < 1:
            raise ValueError(f"total_samples must be positive, got {total_samples}")
        if piece_seconds <= 0:
            raise ValueError(f"piece_seconds must be positive, got {piece_seconds}")
        self.total_samples = int(total_samples)
        self.piece_seconds = float(piece_seconds)
        self.n_speakers = n_speakers
        self.seed = seed
        self.synthesis_s = 0.0
        self.pieces_made = 0

    @property
    def n_pieces(self) -> int:
        piece = int(round(self.piece_seconds * SAMPLE_RATE))
        return math.ceil(self.total_samples / piece)

    def pieces(self) -> Iterator[np.ndarray]:
        made = 0
        k = 0
        while made < self.total_samples:
            t0 = time.perf_counter()
            audio, _turns = conversation(self.piece_seconds, n_speakers=self.n_speakers, seed=self.seed + k)
            audio = audio[: self.total_samples - made]
            self.synthesis_s += time.perf_counter() - t0
            self.pieces_made += 1
            made += audio.size
            k += 1
            yield audio

    def slices(self, size: int) -> Iterator[np.ndarray]:
        """The audio in slices of at most ``size`` samples (piece boundaries cut slices short)."""
        for piece in self.pieces():
            for a in range(0, piece.size, size):
                yield piece[a:a + size]


# ---- memory of processes --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ProcMemory:
    pid: int
    label: str
    rss_kb: int  # VmRSS
    anon_kb: int  # RssAnon


def _status_fields(pid: int) -> Dict[str, int]:
    out: Dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0])
    return out


def process_tree(root: int) -> List[int]:
    """``root`` and all its descendants (from the parent ids in /proc/*/stat), root first."""
    children: Dict[int, List[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue  # gone meanwhile
        # comm may contain spaces and parentheses: the fields after the last ')' are fixed
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(sorted(children.get(pid, ())))
    return tree


def process_label(pid: int) -> str:
    """``tritonserver``, ``stub:<model>`` for a Python-backend stub (its first argument is the model's
    ``<repository>/<model>/<version>/model.py``), else the command's name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    argv = [a.decode(errors="replace") for a in argv if a]
    if not argv:
        return f"pid {pid}"
    name = Path(argv[0]).name
    if name == "triton_python_backend_stub" and len(argv) > 1:
        parts = Path(argv[1]).parts
        return f"stub:{parts[-3]}" if len(parts) >= 3 else "stub"
    return name


def tree_memory(root: int, labels: Dict[int, str]) -> List[ProcMemory]:
    """Memory of every process in ``root``'s tree (``labels`` caches process labels by pid)."""
    out = []
    for pid in process_tree(root):
        try:
            fields = _status_fields(pid)
        except OSError:
            continue
        if pid not in labels:
            labels[pid] = process_label(pid)
        out.append(ProcMemory(pid, labels[pid], fields.get("VmRSS", 0), fields.get("RssAnon", 0)))
    return out


def own_memory() -> Tuple[int, int]:
    fields = _status_fields(os.getpid())
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0)


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads) so far, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def _cpu_of(pids: Iterable[int]) -> Dict[int, float]:
    """CPU seconds so far of each of ``pids`` that still runs."""
    out: Dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[pid] = cpu_seconds(pid)
    return out


class CpuMeter:
    """CPU time the server's process tree spent between two calls (the tree is listed again on
    ``refresh``: a process found then counts from then on; processes that ended count no more). It
    depends less than the step latency on what else runs on the machine (not at all only on an idle one:
    spinning threads burn more CPU when descheduled), so it shows better whether the *work* per step
    changes with the stream's age."""

    def __init__(self, root: Optional[int]) -> None:
        self.root = root
        self._last: Dict[int, float] = {}  # pid -> its CPU seconds at the previous call
        self.refresh()

    def refresh(self) -> None:
        if self.root is not None:
            new = [pid for pid in process_tree(self.root) if pid not in self._last]
            self._last.update(_cpu_of(new))

    def delta_ms(self) -> float:
        """Milliseconds of server CPU since the previous call (nan without a server pid)."""
        if self.root is None:
            return math.nan
        now = _cpu_of(self._last)
        delta = sum(seconds - self._last[pid] for pid, seconds in now.items())
        self._last = now
        return delta * 1000.0


@dataclasses.dataclass
class RssSample:
    request: int  # requests answered when sampled (0 = before the stream)
    stream_s: float  # stream time (audio seconds sent and answered)
    wall_s: float  # since the stream started
    server_rss_mb: float  # sum of VmRSS over the server's processes (nan without a pid)
    server_anon_mb: float  # sum of RssAnon
    client_rss_mb: float
    client_anon_mb: float
    loadavg: float
    processes: Dict[str, float]  # label (pid) -> VmRSS MB
    tag: str = ""  # "idle", "warmup", "end" or ""


class MemoryProbe:
    def __init__(self, server_pid: Optional[int]) -> None:
        self.server_pid = server_pid
        self._labels: Dict[int, str] = {}

    def sample(self, request: int, stream_s: float, wall_s: float, tag: str = "") -> RssSample:
        procs: List[ProcMemory] = []
        if self.server_pid is not None:
            procs = tree_memory(self.server_pid, self._labels)
        client_rss, client_anon = own_memory()
        if procs:
            server_rss = sum(p.rss_kb for p in procs) / 1024.0
            server_anon = sum(p.anon_kb for p in procs) / 1024.0
        else:
            server_rss = server_anon = math.nan
        return RssSample(request, stream_s, wall_s, server_rss, server_anon, client_rss / 1024.0,
                         client_anon / 1024.0, load_average(),
                         {f"{p.label} ({p.pid})": p.rss_kb / 1024.0 for p in procs}, tag)


# ---- server-side time per model (Triton's statistics) ---------------------------------------------
Snapshot = Dict[str, Dict[str, Tuple[int, int]]]  # model -> stat -> (count, ns)
STAT_KINDS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


class ServerStats:
    """Snapshots of Triton's cumulative per-model statistics (best effort: None when unavailable).

    The differences between two snapshots give each model's mean queue and compute time per execution
    over that stretch of the stream: where the step time goes, and whether it is the server's part that
    changes. With ``--url``, other traffic on that server counts in them.
    """

    def __init__(self, url: str, protocol: str) -> None:
        self.url, self.protocol = url, protocol
        self._client: Any = None

    def snapshot(self) -> Optional[Snapshot]:
        try:
            if self._client is None:
                if self.protocol == "http":
                    import tritonclient.http as httpclient

                    self._client = httpclient.InferenceServerClient(self.url)
                else:
                    import tritonclient.grpc as grpcclient

                    self._client = grpcclient.InferenceServerClient(self.url)
            doc = self._client.get_inference_statistics(**({} if self.protocol == "http" else {"as_json": True}))
        except Exception:  # noqa: BLE001 - statistics are an extra, never a reason to stop the run
            return None
        out: Snapshot = {}
        for model in doc.get("model_stats", []):
            stats = model.get("inference_stats", {})
            out[model["name"]] = {k: (int(stats.get(k, {}).get("count", 0)), int(stats.get(k, {}).get("ns", 0)))
                                  for k in STAT_KINDS}
        return out

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()


def stats_between(a: Optional[Snapshot], b: Optional[Snapshot]) -> Dict[str, Dict[str, float]]:
    """Per model: executions and mean ms per execution of each statistic between snapshots a and b."""
    if not a or not b:
        return {}
    out: Dict[str, Dict[str, float]] = {}
    for model, after in b.items():
        before = a.get(model, {})
        n = after["success"][0] - before.get("success", (0, 0))[0]
        if n <= 0:
            continue
        row: Dict[str, float] = {"count": float(n)}
        for kind in STAT_KINDS:
            row[f"{kind}_ms"] = (after[kind][1] - before.get(kind, (0, 0))[1]) / n / 1e6
        out[model] = row
    return out


# ---- the run ----------------------------------------------------------------------------------------
def warmup_requests(preset: Preset, minimum: int = 3) -> int:
    """Requests until the speaker cache and FIFO are full and the chunk after that is confirmed."""
    fill = math.ceil((preset.spkcache_len + preset.fifo_len) / preset.chunk_len)
    right = math.ceil(preset.right_context / preset.chunk_len)
    return max(minimum, fill + right + 1)


@dataclasses.dataclass
class StepRecord:
    index: int
    stream_s: float  # audio sent up to and including this request
    latency_ms: float
    n_confirmed: int
    kind: str  # "audio" (a full step), "tail" (end of audio, flush, END)
    server_cpu_ms: float = math.nan  # CPU time of the server's processes since the previous answer


def _percentile(values: Sequence[float], q: float) -> float:
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _slope_per_hour(x_s: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y against x (seconds), per hour; nan with fewer than 3 points."""
    x = np.asarray(x_s, dtype=np.float64)
    v = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(v)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0:
        return math.nan
    return float(np.polyfit(x[ok], v[ok], 1)[0] * 3600.0)


def run_stream(url: str, preset: Preset, minutes: float, probe: MemoryProbe, protocol: str = "grpc",
               timeout: float = 120.0, rss_every: Optional[int] = None, warmup_min: int = 3,
               piece_seconds: float = DEFAULT_PIECE_SECONDS, seed: int = 0,
               progress: bool = True) -> Dict[str, Any]:
    """Stream ``minutes`` of synthetic audio through one stream; the raw records and the checks."""
    from clients.sortformer_client import DiarizationClient, Result, Update

    total_samples = int(round(minutes * 60.0 * SAMPLE_RATE))
    n_requests = requests_for(preset, total_samples)
    n_full = total_samples // preset.step_samples  # full audio steps; the rest is the tail
    warmup = min(warmup_requests(preset, warmup_min), max(1, n_requests - 1))
    every = rss_every or max(1, n_requests // RSS_SAMPLES_TARGET)
    audio = SyntheticLongAudio(total_samples, piece_seconds, seed=seed)
    duration_s = total_samples / SAMPLE_RATE

    steps: List[StepRecord] = []
    rss: List[RssSample] = []
    # Triton statistics at the edges of the first and last 10 % windows of the full audio steps (as in
    # ``summarize``) and after the warm-up
    window = _window(n_full)
    marks = {"first_window": window, "warmup": warmup, "last_window_start": n_full - window,
             "last_window_end": n_full} if window else {"warmup": warmup}
    stats = ServerStats(url, protocol)
    snaps: Dict[str, Optional[Snapshot]] = {}
    t_start = time.perf_counter()
    rss.append(probe.sample(0, 0.0, 0.0, "idle"))
    cpu = CpuMeter(probe.server_pid)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_requests, unit="req", desc=f"{preset.name} {minutes:g} min", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)

    def on_update(update: Update) -> None:
        i = update.index
        stream_s = min((i + 1) * preset.step_seconds, duration_s)
        steps.append(StepRecord(i, stream_s, update.latency_s * 1000.0, update.n_confirmed,
                                "audio" if i < n_full else "tail", cpu.delta_ms()))
        answered = i + 1
        tag = "warmup" if answered == warmup else ""
        if answered <= 2 or tag:
            cpu.refresh()  # the stubs of the stream's models exist from the first request on
        for name, at in marks.items():
            if answered == at:
                snaps[name] = stats.snapshot()
        if tag or answered % every == 0:
            rss.append(probe.sample(answered, stream_s, time.perf_counter() - t_start, tag))
        if bar is not None:
            bar.update(1)
            if tag or answered % every == 0:
                last = rss[-1]
                bar.set_postfix(step_ms=f"{update.latency_s * 1000:.0f}",
                                server_mb=f"{last.server_rss_mb:.0f}", client_mb=f"{last.client_rss_mb:.0f}",
                                load=f"{last.loadavg:.1f}", refresh=False)

    client = DiarizationClient(url, protocol=protocol, preset=preset, timeout=timeout)
    result = None
    interrupted = False
    try:
        client.check()
        snaps["before"] = stats.snapshot()
        snaps.update({name: snaps["before"] for name, at in marks.items() if at == 0})
        stream = client.open_stream(on_update=on_update)
        try:
            for piece in audio.slices(preset.step_samples):
                stream.feed(piece, SAMPLE_RATE)
            result = stream.close()
        except KeyboardInterrupt:
            # Ctrl-C / SIGTERM: end the sequence (END) and keep the figures measured so far
            interrupted = True
            result = Result(sequence_id=stream.sequence_id, preset=preset.name, n_samples=stream.samples_sent,
                            probs=stream.confirmed, segments=tuple(stream.finalized_segments),
                            requests=len(steps), finished=False)
            stream.abort()
        except BaseException:
            stream.abort()
            raise
    finally:
        client.close()
        if bar is not None:
            bar.close()
    wall_s = time.perf_counter() - t_start
    snaps["end"] = stats.snapshot()
    stats.close()
    sent_s = steps[-1].stream_s if steps else 0.0
    rss.append(probe.sample(len(steps), duration_s if not interrupted else sent_s, wall_s, "end"))
    return {
        "interrupted": interrupted,
        "server_stats": {
            "first_window": stats_between(snaps.get("before"), snaps.get("first_window")),
            "last_window": stats_between(snaps.get("last_window_start"), snaps.get("last_window_end")),
            "after_warmup": stats_between(snaps.get("warmup"), snaps.get("end")),
        },
        "preset": preset, "minutes": minutes, "total_samples": total_samples, "duration_s": duration_s,
        "n_requests": n_requests, "n_full": n_full, "warmup": warmup, "rss_every": every,
        "steps": steps, "rss": rss, "result": result, "wall_s": wall_s,
        "synthesis_s": audio.synthesis_s, "pieces": audio.pieces_made, "piece_seconds": piece_seconds,
        "seed": seed, "protocol": protocol,
    }


def _window(n: int) -> int:
    """How many of ``n`` records the first / last 10 % windows hold (0 for none, else at least 1)."""
    return max(1, int(round(WINDOW_FRACTION * n))) if n else 0


def _first_last(records: Sequence[Any], field: str) -> Tuple[float, float, float]:
    """Median of ``field`` over the first and the last 10 % of ``records`` (finite values), and last / first."""
    w = _window(len(records))

    def med(part: Sequence[Any]) -> float:
        vals = [getattr(x, field) for x in part if np.isfinite(getattr(x, field))]
        return float(np.median(vals)) if vals else math.nan

    first, last = (med(records[:w]), med(records[-w:])) if w else (math.nan, math.nan)
    return first, last, last / first if first and np.isfinite(first) else math.nan


def _steady_growth(values: Sequence[float]) -> float:
    """Median of the last 10 % of the samples minus median of the first 10 % (robust to the sawtooth of
    the client's audio synthesis and to single samples)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return math.nan
    q = _window(v.size)
    return float(np.median(v[-q:]) - np.median(v[:q]))


def memory_figures(rss: Sequence[RssSample]) -> Dict[str, Any]:
    """Memory figures from the samples: after warm-up (``start``), max, end, growths, trend, per process."""
    start = next((r for r in rss if r.tag == "warmup"), rss[0])
    measured = [r for r in rss if r.request >= start.request]
    end = rss[-1]

    def mem(field: str) -> Dict[str, float]:
        vals = [getattr(r, field) for r in measured]
        s, e = getattr(start, field), getattr(end, field)
        finite = [v for v in vals if np.isfinite(v)]
        top = max(finite) if finite else math.nan
        return {"idle": getattr(rss[0], field), "start": s, "max": top, "end": e, "growth": e - s,
                "max_growth": top - s, "steady_growth": _steady_growth(vals),
                "trend_mb_per_hour": _slope_per_hour([r.stream_s for r in measured], vals)}

    per_process = {}
    for label in start.processes:
        series = [r.processes.get(label, math.nan) for r in measured]
        finite = [v for v in series if np.isfinite(v)]
        per_process[label] = {"start": start.processes[label], "max": max(finite) if finite else math.nan,
                              "end": end.processes.get(label, math.nan),
                              "growth": end.processes.get(label, math.nan) - start.processes[label],
                              "steady_growth": _steady_growth(series)}
    return {"server_rss_mb": mem("server_rss_mb"), "server_anon_mb": mem("server_anon_mb"),
            "client_rss_mb": mem("client_rss_mb"), "client_anon_mb": mem("client_anon_mb"),
            "per_process_rss_mb": per_process, "rss_start": {"request": start.request, "stream_s": start.stream_s}}


LOAD_BAND = 1.0  # steady-load stretch: the 1-min load average varies by at most this much
LOAD_STRETCH_MIN_FRACTION = 0.2  # ... over at least this share of the audio steps after warm-up


def load_matched(steps: Sequence[StepRecord], rss: Sequence[RssSample], warmup: int) -> Dict[str, Any]:
    """Step latency and server CPU, first vs last 10 % of the longest stretch of audio steps (after the
    warm-up) over which the machine's 1-min load average stayed within ``LOAD_BAND``.

    On a shared machine the step latency (and, less so, the CPU time: ONNX Runtime's threads spin
    while they wait for each other) follows the load other processes put on the CPUs; within such a
    stretch that load is about the same at both ends, so a ratio far from 1 there is the stream's own
    doing. Empty when no stretch covers ``LOAD_STRETCH_MIN_FRACTION`` of the steps (or no load known).
    """
    audio = [x for x in steps if x.kind == "audio" and x.index >= warmup]
    samples = [(r.request, r.loadavg) for r in rss if np.isfinite(r.loadavg)]
    if len(audio) < 10 or len(samples) < 2:
        return {}
    req, load = np.array([a for a, _ in samples], float), np.array([b for _, b in samples], float)
    loads = np.interp([x.index + 1 for x in audio], req, load)  # load when each step was answered
    best, lo = (0, 0), 0
    for hi in range(len(loads)):  # longest window with max - min <= band (O(n x stretch); n <= ~30k requests)
        while loads[lo:hi + 1].max() - loads[lo:hi + 1].min() > LOAD_BAND:
            lo += 1
        if hi + 1 - lo > best[1] - best[0]:
            best = (lo, hi + 1)
    a, b = best
    if b - a < max(10, LOAD_STRETCH_MIN_FRACTION * len(audio)):
        return {}
    part = audio[a:b]
    out: Dict[str, Any] = {"steps": len(part), "window": _window(len(part)), "from_s": part[0].stream_s,
                           "to_s": part[-1].stream_s, "load_min": float(loads[a:b].min()),
                           "load_max": float(loads[a:b].max())}
    for field, key in (("latency_ms", "latency"), ("server_cpu_ms", "cpu")):
        out[f"{key}_first10_median"], out[f"{key}_last10_median"], out[f"{key}_ratio"] = _first_last(part, field)
    return out


def summarize(run: Dict[str, Any]) -> Dict[str, Any]:
    """The figures of one run (JSON-ready)."""
    preset: Preset = run["preset"]
    steps: List[StepRecord] = run["steps"]
    rss: List[RssSample] = run["rss"]
    result = run["result"]
    warmup = run["warmup"]

    lat = [s.latency_ms for s in steps]
    cpu = [s.server_cpu_ms for s in steps]
    audio_steps = [s for s in steps if s.kind == "audio"]
    w = _window(len(audio_steps))
    first, last, step_ratio = _first_last(audio_steps, "latency_ms")
    cpu_first, cpu_last, cpu_ratio = _first_last(audio_steps, "server_cpu_ms")
    after = [s for s in audio_steps if s.index >= warmup]
    interrupted = bool(run.get("interrupted"))
    frames_expected = expected_frames(run["total_samples"])
    audio_s = steps[-1].stream_s if interrupted and steps else run["duration_s"]

    cpu_ok = [c for c in cpu if np.isfinite(c)]

    memory = memory_figures(rss)
    loads = [r.loadavg for r in rss]
    latency_sum_s = sum(lat) / 1000.0
    out = {
        "preset": preset.name, "step_seconds": preset.step_seconds, "minutes": run["minutes"],
        "duration_s": run["duration_s"], "protocol": run["protocol"],
        "requests": {"expected": run["n_requests"], "answered": len(steps), "full_audio_steps": run["n_full"],
                     "warmup": warmup, "rss_every": run["rss_every"], "window": w},
        "interrupted": interrupted, "audio_s": audio_s,
        "frames": {"confirmed": int(result.n_frames), "expected": int(frames_expected),
                   "all_confirmed": bool(not interrupted and result.n_frames == frames_expected and result.finished),
                   "finished_flag": bool(result.finished)},
        "segments": {"finalized": len(result.segments), "speakers": result.speakers,
                     "last_end_s": max((s.end for s in result.segments), default=0.0),
                     "within_stream": all(0.0 <= s.start <= s.end <= run["duration_s"] + 1e-6
                                          for s in result.segments)},
        "step_ms": {"p50": _percentile(lat, 50), "p95": _percentile(lat, 95), "max": max(lat) if lat else math.nan,
                    "min": min(lat) if lat else math.nan, "mean": float(np.mean(lat)) if lat else math.nan,
                    "first10_median": first, "last10_median": last, "ratio_last_first": step_ratio,
                    "trend_ms_per_hour": _slope_per_hour([s.stream_s for s in after],
                                                         [s.latency_ms for s in after])},
        "server_cpu_ms": {"p50": _percentile(cpu_ok, 50), "p95": _percentile(cpu_ok, 95),
                          "max": max(cpu_ok) if cpu_ok else math.nan, "total_s": sum(cpu_ok) / 1000.0,
                          "first10_median": cpu_first, "last10_median": cpu_last, "ratio_last_first": cpu_ratio,
                          "trend_ms_per_hour": _slope_per_hour([x.stream_s for x in after],
                                                               [x.server_cpu_ms for x in after])},
        **memory,
        "client_result": {"probs_mb": result.probs.nbytes / MB, "probs_shape": list(result.probs.shape),
                          "segments": len(result.segments)},
        "time": {"wall_s": run["wall_s"], "steps_s": latency_sum_s, "synthesis_s": run["synthesis_s"],
                 "rtf_wall": run["wall_s"] / audio_s if audio_s else math.nan,
                 "rtf_steps": latency_sum_s / audio_s if audio_s else math.nan,
                 "speed_x_realtime": audio_s / latency_sum_s if latency_sum_s else math.nan},
        "server_stats": run.get("server_stats", {}),
        "load_matched": load_matched(steps, rss, warmup),
        "audio": {"pieces": run["pieces"], "piece_seconds": run["piece_seconds"], "seed": run["seed"],
                  "speakers": DEFAULT_SPEAKERS},
        "loadavg": {"start": loads[0], "end": loads[-1], "mean": float(np.nanmean(loads)),
                    "max": float(np.nanmax(loads))},
    }
    out["verdict"] = verdict(out)
    return out


def verdict(s: Dict[str, Any]) -> Dict[str, Any]:
    """Bounded or not, by the stated rules: the last/first 10 % ratio of the step latency and of the server
    CPU per step (over the steady-load stretch when there is one, else the whole stream) at most
    ``STEP_RATIO_BOUND``; the server's RSS growth (end - after warm-up) at most max(20 MB, 5 %)."""
    lm = s.get("load_matched") or {}
    lat = lm.get("latency_ratio", s["step_ms"]["ratio_last_first"])
    cpu = lm.get("cpu_ratio", (s.get("server_cpu_ms") or {}).get("ratio_last_first", math.nan))
    server = s["server_rss_mb"]
    bound = max(RSS_GROWTH_BOUND_MB, RSS_GROWTH_BOUND_FRACTION * server["start"]) \
        if np.isfinite(server["start"]) else math.nan

    def ok(value: float, limit: float) -> Optional[bool]:
        return bool(value <= limit) if np.isfinite(value) and np.isfinite(limit) else None

    return {"step_time_bounded": ok(lat, STEP_RATIO_BOUND), "step_cpu_bounded": ok(cpu, STEP_RATIO_BOUND),
            "server_rss_bounded": ok(server["growth"], bound), "over": "steady-load stretch" if lm else "stream",
            "step_ratio_bound": STEP_RATIO_BOUND, "server_growth_bound_mb": bound}


# ---- outputs ----------------------------------------------------------------------------------------
def write_csvs(run: Dict[str, Any], out: Path) -> None:
    with open(out / "steps.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "stream_s", "latency_ms", "server_cpu_ms", "n_confirmed", "kind"])
        for s in run["steps"]:
            w.writerow([s.index, f"{s.stream_s:.3f}", f"{s.latency_ms:.3f}", f"{s.server_cpu_ms:.1f}",
                        s.n_confirmed, s.kind])
    labels = sorted({k for r in run["rss"] for k in r.processes})
    with open(out / "rss.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["request", "stream_s", "wall_s", "tag", "server_rss_mb", "server_anon_mb", "client_rss_mb",
                    "client_anon_mb", "loadavg", *labels])
        for r in run["rss"]:
            w.writerow([r.request, f"{r.stream_s:.3f}", f"{r.wall_s:.3f}", r.tag, f"{r.server_rss_mb:.2f}",
                        f"{r.server_anon_mb:.2f}", f"{r.client_rss_mb:.2f}", f"{r.client_anon_mb:.2f}",
                        f"{r.loadavg:.2f}", *(f"{r.processes.get(k, math.nan):.2f}" for k in labels)])


def plot(run: Dict[str, Any], summary: Dict[str, Any], path: Path, title: str) -> None:
    """Step latency and server CPU per step; resident memory; its change since the warm-up; load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, rss = run["steps"], run["rss"]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True, gridspec_kw={"height_ratios": [3, 2.4, 2.4, 1.2]})
    ax = axes[0]
    x = np.array([s.stream_s / 60.0 for s in steps])
    ms = 2.5 if len(steps) > 500 else 4
    k = max(1, len(steps) // 40)

    def rolling(v: np.ndarray) -> np.ndarray:
        return np.array([np.nanmedian(v[max(0, i - k // 2):i + k // 2 + 1]) for i in range(len(v))])

    y = np.array([s.latency_ms for s in steps])
    ax.plot(x, y, ".", ms=ms, alpha=0.45, color="tab:blue", label="step latency")
    if k > 1:
        ax.plot(x, rolling(y), "-", color="tab:blue", lw=1.5, label=f"latency, rolling median ({k} requests)")
    c = np.array([s.server_cpu_ms for s in steps])
    if np.isfinite(c).any():
        ax.plot(x, c, ".", ms=ms, alpha=0.45, color="tab:orange", label="server CPU time per step")
        if k > 1:
            ax.plot(x, rolling(c), "-", color="tab:red", lw=1.5, label="CPU, rolling median")
    sm = summary["step_ms"]
    top = max(sm["p95"] * 1.6, sm["p50"] * 2.0)
    cpu_p95 = (summary.get("server_cpu_ms") or {}).get("p95", math.nan)
    if np.isfinite(cpu_p95):
        top = max(top, cpu_p95 * 1.6)
    ax.set_ylim(bottom=0, top=top)
    ax.set_ylabel("ms per step")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=10)

    rx = np.array([r.stream_s / 60.0 for r in rss])
    start = next((r for r in rss if r.tag == "warmup"), rss[0])
    mine = {"tritonserver", "stub:postprocessor", f"stub:preprocessor_{summary['preset']}",
            f"stub:sortformer_{summary['preset']}"}  # the processes this stream runs through
    stream_labels = [label for label in summary["per_process_rss_mb"] if label.split(" ")[0] in mine]
    colors = dict(zip(stream_labels, ("tab:purple", "tab:orange", "tab:green", "tab:red")))
    series = []  # (label, values, style, colour)
    if np.isfinite([r.server_rss_mb for r in rss]).any():
        series.append(("server: VmRSS sum", [r.server_rss_mb for r in rss], "-", "tab:blue"))
        series.append(("server: RssAnon sum", [r.server_anon_mb for r in rss], "--", "tab:blue"))
        for label in stream_labels:
            series.append((label, [r.processes.get(label, math.nan) for r in rss], "-", colors[label]))
    series.append(("client: VmRSS", [r.client_rss_mb for r in rss], "-", "black"))
    series.append(("client: RssAnon", [r.client_anon_mb for r in rss], "--", "black"))
    base = {"server: VmRSS sum": start.server_rss_mb, "server: RssAnon sum": start.server_anon_mb,
            "client: VmRSS": start.client_rss_mb, "client: RssAnon": start.client_anon_mb}
    base.update({label: start.processes.get(label, math.nan) for label in stream_labels})
    for label, values, style, colour in series:
        axes[1].plot(rx, values, style, color=colour, lw=1.2, label=label)
        delta = np.asarray(values, dtype=np.float64) - base[label]
        axes[2].plot(rx, np.where(rx >= start.stream_s / 60.0, delta, np.nan), style, color=colour, lw=1.2)
    for ax in axes[1:3]:
        ax.axvline(start.stream_s / 60.0, color="grey", ls=":", lw=1)
    axes[1].set_ylabel("resident memory (MB)")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(loc="center right", ncol=2, fontsize=7, framealpha=0.85)
    axes[2].set_ylabel("change since warm-up (MB)")
    axes[2].axhline(0, color="grey", lw=0.8)

    ax = axes[3]
    ax.plot(rx, [r.loadavg for r in rss], "-", color="tab:green")
    ax.set_ylabel("load (1 min)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("stream time (min of audio); dotted line: end of warm-up")
    for a_ in axes:
        a_.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_run(out: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """An earlier run's raw records (``steps.csv``, ``rss.csv``) and its ``summary.json`` document."""
    doc = json.loads((out / "summary.json").read_text())
    with open(out / "steps.csv", newline="") as fh:
        steps = [StepRecord(int(r["index"]), float(r["stream_s"]), float(r["latency_ms"]), int(r["n_confirmed"]),
                            r["kind"], float(r.get("server_cpu_ms") or "nan")) for r in csv.DictReader(fh)]
    fixed = {"request", "stream_s", "wall_s", "tag", "server_rss_mb", "server_anon_mb", "client_rss_mb",
             "client_anon_mb", "loadavg"}
    rss = []
    with open(out / "rss.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            rss.append(RssSample(int(r["request"]), float(r["stream_s"]), float(r["wall_s"]), float(r["server_rss_mb"]),
                                 float(r["server_anon_mb"]), float(r["client_rss_mb"]), float(r["client_anon_mb"]),
                                 float(r["loadavg"]),
                                 {k: float(v) for k, v in r.items() if k not in fixed and v not in ("", "nan")},
                                 r["tag"]))
    return {"steps": steps, "rss": rss}, doc


def _speed(rtf: float) -> str:
    if not np.isfinite(rtf) or rtf <= 0:
        return "n/a"
    return f"{1 / rtf:.1f}× faster than real time" if rtf <= 1 else f"{rtf:.1f}× slower than real time"


def _mb(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.1f} MB"


def _signed(v: float, unit: str) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:+.1f} {unit}"


def markdown(doc: Dict[str, Any], plot_ref: Optional[str]) -> str:
    s = doc["summary"]
    m = doc["machine"]
    model = doc.get("model") or {}
    sm, fr, seg, tm = s["step_ms"], s["frames"], s["segments"], s["time"]
    nan = float("nan")
    cpu_row = s.get("server_cpu_ms") or {k: nan for k in ("p50", "p95", "max", "first10_median", "last10_median",
                                                          "ratio_last_first", "trend_ms_per_hour")}
    srv, cli, anon = s["server_rss_mb"], s["client_rss_mb"], s["server_anon_mb"]
    req = s["requests"]
    if model:
        model_text = (f"`{model.get('source')}`{' (random init)' if model.get('random_init') else ''}, "
                      f"{model.get('parameters', 0) / 1e6:.2f} M parameters, emb_dim {model.get('emb_dim')}")
    else:
        model_text = "served by a running server (not inspected)"
    ok = "**yes**" if fr["all_confirmed"] else "**NO**"
    verdict = s["verdict"]
    lm = s.get("load_matched") or {}

    def yes_no(v: Optional[bool]) -> str:
        return "n/a" if v is None else ("yes" if v else "**no**")

    lines = [
        f"### `{s['preset']}`: {s['minutes']:g} min stream, {m['date_utc']}",
        "",
    ]
    if s.get("interrupted"):
        lines += [f"**Interrupted** after {s['audio_s'] / 60:.1f} min of audio (of {s['minutes']:g}): the figures "
                  "below cover that part; the stream was ended with END, not closed, so the frame count is "
                  "not checked.", ""]
    lines += [
        f"- Command: `{doc['command']}`",
        f"- Machine: {m['nproc']} usable CPUs ({m['cpu_count']} online), {m['cpu_model']}; {m['platform']}; "
        f"Python {m['python']}. 1-min load average {s['loadavg']['start']:.2f} at the start, "
        f"{s['loadavg']['end']:.2f} at the end, mean {s['loadavg']['mean']:.2f}, max {s['loadavg']['max']:.2f} "
        "over the memory samples (other engineers' processes count in it).",
        f"- Model: {model_text}; server: {doc['server']}; protocol {s['protocol']}, one request in flight, "
        "unpaced (each request sent when the previous one was answered).",
        f"- Stream: {s['duration_s']:.0f} s of synthetic {s['audio']['speakers']}-speaker conversation "
        f"({s['audio']['pieces']} pieces of {s['audio']['piece_seconds']:g} s, seeds {s['audio']['seed']}.."
        f"{s['audio']['seed'] + s['audio']['pieces'] - 1}), preset `{s['preset']}` (step "
        f"{s['step_seconds']:.2f} s): {req['answered']} requests ({req['full_audio_steps']} full audio steps, "
        f"then the end of audio, flush steps and END); warm-up {req['warmup']} requests (speaker cache and "
        f"FIFO full); memory sampled every {req['rss_every']} requests.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| every frame confirmed | {ok}: {fr['confirmed']} of {fr['expected']} frames, FINISHED "
        f"{'set' if fr['finished_flag'] else 'NOT set'} |",
        f"| finalized segments | {seg['finalized']} (speaker slots {', '.join(map(str, seg['speakers'])) or 'none'}; "
        f"last ends at {seg['last_end_s']:.1f} s; all inside the stream: {'yes' if seg['within_stream'] else 'NO'}) |",
        f"| step latency p50 / p95 / max | {sm['p50']:.1f} / {sm['p95']:.1f} / {sm['max']:.1f} ms |",
        f"| step latency median, first 10 % → last 10 % of the audio steps ({req['window']} each) | "
        f"{sm['first10_median']:.1f} → {sm['last10_median']:.1f} ms (**{sm['ratio_last_first']:.3f}×**) |",
        f"| step latency trend after warm-up (least squares) | {_signed(sm['trend_ms_per_hour'], 'ms per hour of audio')} |",
        *([] if not np.isfinite(cpu_row["p50"]) else [
            f"| server CPU time per step (all server processes) p50 / p95 / max | {cpu_row['p50']:.1f} / "
            f"{cpu_row['p95']:.1f} / {cpu_row['max']:.1f} ms |",
            f"| server CPU per step median, first 10 % → last 10 % (less load-dependent than the latency) | "
            f"{cpu_row['first10_median']:.1f} → {cpu_row['last10_median']:.1f} ms "
            f"(**{cpu_row['ratio_last_first']:.3f}×**); trend {_signed(cpu_row['trend_ms_per_hour'], 'ms/h')} |"]),
        *([] if not lm else [
            f"| same, over the longest stretch of steady machine load ({lm['steps']} steps, min "
            f"{lm['from_s'] / 60:.0f}–{lm['to_s'] / 60:.0f} of the audio, load {lm['load_min']:.1f}–"
            f"{lm['load_max']:.1f}): latency / server CPU, first 10 % → last 10 % | "
            f"{lm['latency_first10_median']:.1f} → {lm['latency_last10_median']:.1f} ms (**{lm['latency_ratio']:.3f}×**)"
            + (f" / {lm['cpu_first10_median']:.1f} → {lm['cpu_last10_median']:.1f} ms (**{lm['cpu_ratio']:.3f}×**)"
               if np.isfinite(lm["cpu_ratio"]) else " / not measured") + " |"]),
        f"| server RSS (VmRSS summed over tritonserver + stubs): idle / after warm-up / max / end | "
        f"{_mb(srv['idle'])} / {_mb(srv['start'])} / {_mb(srv['max'])} / {_mb(srv['end'])} |",
        f"| server RSS growth: end − after warm-up (max − after warm-up); last 10 % − first 10 % of the "
        f"samples (medians); trend | **{_signed(srv['growth'], 'MB')}** ({_signed(srv['max_growth'], 'MB')}); "
        f"{_signed(srv.get('steady_growth', math.nan), 'MB')}; {_signed(srv['trend_mb_per_hour'], 'MB/h')} |",
        f"| server anonymous memory (RssAnon sum): after warm-up / end; growth | {_mb(anon['start'])} / "
        f"{_mb(anon['end'])}; {_signed(anon['growth'], 'MB')} |",
        f"| client RSS: after warm-up / max / end; growth end − after warm-up; last 10 % − first 10 % "
        f"(medians) | {_mb(cli['start'])} / {_mb(cli['max'])} / {_mb(cli['end'])}; "
        f"**{_signed(cli['growth'], 'MB')}**; {_signed(cli.get('steady_growth', math.nan), 'MB')} |",
        f"| what the client's `Result` holds at the end | probabilities {s['client_result']['probs_shape'][0]} × 4 "
        f"float32 = {s['client_result']['probs_mb']:.2f} MB, {s['client_result']['segments']} segments |",
        f"| real-time factor (step latencies / audio) | **{tm['rtf_steps']:.3f}** ({_speed(tm['rtf_steps'])}) |",
        f"| wall time (real-time factor incl. client-side audio synthesis) | {tm['wall_s'] / 60:.1f} min "
        f"({tm['rtf_wall']:.3f}); synthesis {tm['synthesis_s'] / 60:.1f} min of it |",
        f"| bounded? (last/first 10 % ratio ≤ {verdict['step_ratio_bound']} over the "
        f"{verdict.get('over', 'stream')}; server growth ≤ {verdict['server_growth_bound_mb']:.0f} MB) | step "
        f"latency: {yes_no(verdict['step_time_bounded'])}, server CPU per step: "
        f"{yes_no(verdict.get('step_cpu_bounded'))}, server RSS: {yes_no(verdict['server_rss_bounded'])} |",
        "",
    ]
    if s["per_process_rss_mb"]:
        lines += ["Resident memory per process (VmRSS, MB; idle stubs of other presets included; steady growth = "
                  "median of the last 10 % of the samples − median of the first 10 % after warm-up):", "",
                  "| process (pid) | after warm-up | max | end | growth | steady growth |", "|---|---|---|---|---|---|"]
        for label, v in s["per_process_rss_mb"].items():
            lines.append(f"| {label} | {v['start']:.1f} | {v['max']:.1f} | {v['end']:.1f} | {v['growth']:+.1f} | "
                         f"{_signed(v.get('steady_growth', math.nan), '')} |")
        lines.append("")
    st = s.get("server_stats") or {}
    models = sorted(set(st.get("after_warmup", {})) | set(st.get("first_window", {})))
    if models:
        def cell(window: str, model: str) -> str:
            row = st.get(window, {}).get(model)
            if not row:
                return "n/a"
            return f"{row['compute_infer_ms']:.1f} / {row['queue_ms']:.1f} ({row['success_ms']:.1f})"

        lines += ["Server time per execution from Triton's statistics, mean ms: compute / queue (whole request "
                  "inside the server); the ensemble's compute is the sum of its steps:", "",
                  "| model | first 10 % of the audio steps | last 10 % | everything after warm-up |",
                  "|---|---|---|---|"]
        for model in models:
            lines.append(f"| {model} | {cell('first_window', model)} | {cell('last_window', model)} | "
                         f"{cell('after_warmup', model)} |")
        lines.append("")
    if plot_ref:
        lines += [f"![step latency, resident memory and load against stream time ({s['preset']})]({plot_ref})", ""]
    return "\n".join(lines)


def update_markdown(path: Path, label: str, section: str) -> None:
    """Put ``section`` between this label's markers in ``path`` (appended when they are missing)."""
    replace_marked_section(path, f"long_stream:{label}", section, "Long streams")


def print_summary(s: Dict[str, Any]) -> None:
    sm, fr, tm, srv, cli = s["step_ms"], s["frames"], s["time"], s["server_rss_mb"], s["client_rss_mb"]
    print(f"[long_stream] {s['preset']} {s['minutes']:g} min: {s['requests']['answered']} requests, "
          f"frames {fr['confirmed']}/{fr['expected']} confirmed (finished={fr['finished_flag']}), "
          f"{s['segments']['finalized']} segments", flush=True)
    print(f"  step ms p50 {sm['p50']:.1f}  p95 {sm['p95']:.1f}  max {sm['max']:.1f}; median first 10 % "
          f"{sm['first10_median']:.1f} -> last 10 % {sm['last10_median']:.1f} (x{sm['ratio_last_first']:.3f}); "
          f"trend {sm['trend_ms_per_hour']:+.1f} ms/h", flush=True)
    c = s.get("server_cpu_ms") or {k: math.nan for k in ("p50", "p95", "first10_median", "last10_median",
                                                         "ratio_last_first", "trend_ms_per_hour")}
    print(f"  server CPU ms/step p50 {c['p50']:.1f}  p95 {c['p95']:.1f}; median first 10 % {c['first10_median']:.1f} "
          f"-> last 10 % {c['last10_median']:.1f} (x{c['ratio_last_first']:.3f}); trend {c['trend_ms_per_hour']:+.1f} ms/h",
          flush=True)
    print(f"  server RSS MB idle {srv['idle']:.1f}  start {srv['start']:.1f}  max {srv['max']:.1f}  end "
          f"{srv['end']:.1f}  growth {srv['growth']:+.1f}, steady {srv.get('steady_growth', math.nan):+.1f} "
          f"(trend {srv['trend_mb_per_hour']:+.1f} MB/h)", flush=True)
    print(f"  client RSS MB start {cli['start']:.1f}  max {cli['max']:.1f}  end {cli['end']:.1f}  growth "
          f"{cli['growth']:+.1f}, steady {cli.get('steady_growth', math.nan):+.1f}; result probs {s['client_result']['probs_mb']:.2f} MB", flush=True)
    print(f"  RTF {tm['rtf_steps']:.3f} (steps), {tm['rtf_wall']:.3f} (wall {tm['wall_s'] / 60:.1f} min, synthesis "
          f"{tm['synthesis_s']:.0f} s); load avg start {s['loadavg']['start']:.2f} end {s['loadavg']['end']:.2f} "
          f"max {s['loadavg']['max']:.2f}", flush=True)


def _model_info(repository: Optional[Path]) -> Dict[str, Any]:
    if repository is None:
        return {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((Path(repository) / "export_info.json").read_text())
        return {k: info.get(k) for k in ("source", "random_init", "parameters", "emb_dim")}
    return {}


def _display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    if any(a == "--render" or a.startswith("--render=") for a in argv_list):
        return render(argv_list)
    ap = argparse.ArgumentParser(prog="python -m loadtest.long_stream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(ap, "a running server's gRPC (or HTTP, with --protocol http) host:port",
                         preset_help="the one preset to stream (default very_high)")
    ap.add_argument("--server-pid", type=int, default=None,
                    help="with --url: the tritonserver's pid, to measure its processes' memory (default: not measured)")
    ap.add_argument("--minutes", type=float, default=120.0, help="stream length in minutes of audio (default 120)")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default %(default)s)")
    ap.add_argument("--rss-every", type=int, default=None,
                    help=f"sample memory every N requests (default: about {RSS_SAMPLES_TARGET} samples per run)")
    ap.add_argument("--warmup-requests", type=int, default=3,
                    help="at least this many warm-up requests (default 3; longer while the speaker cache fills)")
    ap.add_argument("--piece-seconds", type=float, default=DEFAULT_PIECE_SECONDS,
                    help="length of each synthesized conversation piece (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first piece (piece k: seed + k)")
    ap.add_argument("--label", default=None, help="name of this run (default: the preset)")
    ap.add_argument("--out", type=Path, default=None, help="default results/long_stream/<label>")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="put this run's section into this markdown file (e.g. docs/long_streams.md)")
    ap.add_argument("--plot", type=Path, default=None, help="also write the plot here (e.g. docs/long_streams_low.png)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--render", type=Path, default=None,
                    help="measure nothing: redo the plot and markdown (with --markdown/--plot) of the run in this "
                         "--out directory")
    args = ap.parse_args(argv_list)

    presets = parse_presets(args.preset, default="very_high")
    if len(presets) != 1:
        ap.error("give exactly one --preset")
    preset = presets[0]
    if args.minutes <= 0:
        ap.error("--minutes must be positive")
    if args.server_pid is not None and args.url is None:
        ap.error("--server-pid goes with --url (a server started here is measured anyway)")
    label = args.label or preset.name
    out = results_dir("long_stream", args.out or REPO_ROOT / "results" / "long_stream" / label)
    command = "python -m loadtest.long_stream " + " ".join(argv_list)

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # kill PID = Ctrl-C
    try:
        return _run(args, preset, label, out, command)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, preset: Preset, label: str, out: Path, command: str) -> int:
    with serve(args.url, args.model_repository, log_path=out / "tritonserver.log") as endpoint:
        server_pid = endpoint.pid if args.url is None else args.server_pid
        server_text = (f"local tritonserver 2.51 (nvidia-pytriton, Python-backend runner of the ONNX graphs) on "
                       f"`{_display_path(args.model_repository)}`" if args.url is None else f"`{args.url}`")
        print(f"[long_stream] {preset.name}: {args.minutes:g} min of audio, "
              f"{requests_for(preset, int(round(args.minutes * 60 * SAMPLE_RATE)))} requests, server pid "
              f"{server_pid if server_pid is not None else 'not measured'}, load avg {load_average():.2f}", flush=True)
        run = run_stream(endpoint.for_protocol(args.protocol), preset, args.minutes, MemoryProbe(server_pid),
                         protocol=args.protocol, timeout=args.timeout, rss_every=args.rss_every,
                         warmup_min=args.warmup_requests, piece_seconds=args.piece_seconds, seed=args.seed,
                         progress=not args.no_progress)
    summary = summarize(run)
    doc = {"label": label, "command": command, "machine": machine_info(), "server": server_text,
           "server_pid": server_pid, "model": _model_info(args.model_repository), "summary": summary}
    (out / "summary.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    write_csvs(run, out)
    write_outputs(run, doc, out, args.markdown, args.plot)
    print(f"[long_stream] wrote {out}", flush=True)
    if summary["interrupted"]:
        print(f"[long_stream] INTERRUPTED after {summary['audio_s'] / 60:.1f} min of audio", flush=True)
        return 130
    return 0 if summary["frames"]["all_confirmed"] else 1


def write_outputs(run: Dict[str, Any], doc: Dict[str, Any], out: Path, markdown_path: Optional[Path],
                  plot_path: Optional[Path]) -> None:
    """plot.png and report.md in ``out``; the plot copied to ``plot_path``; the markdown section."""
    summary = doc["summary"]
    title = (f"{summary['preset']}: {summary['minutes']:g} min stream, "
             f"{(doc.get('model') or {}).get('source', 'server')} model, {doc['machine']['date_utc']}")
    plot(run, summary, out / "plot.png", title)
    if plot_path is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "plot.png", plot_path)
    if markdown_path is not None:
        target = plot_path if plot_path is not None else out / "plot.png"
        plot_ref = os.path.relpath(Path(target).resolve(), Path(markdown_path).resolve().parent)
        update_markdown(markdown_path, doc["label"], markdown(doc, plot_ref))
        print(f"[long_stream] updated {markdown_path}", flush=True)
    (out / "report.md").write_text(markdown(doc, "plot.png") + "\n")
    print_summary(summary)


def render(argv: Sequence[str]) -> int:
    """``--render DIR``: measure nothing, redo the plot and markdown of the run in DIR."""
    ap = argparse.ArgumentParser(prog="python -m loadtest.long_stream --render")
    ap.add_argument("--render", type=Path, required=True, help="an earlier run's --out directory")
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    run, doc = load_run(args.render)
    summary = doc["summary"]  # the figures that need only the files, as this version of the tool makes them
    summary.update(memory_figures(run["rss"]))
    summary["load_matched"] = load_matched(run["steps"], run["rss"], summary["requests"]["warmup"])
    summary["verdict"] = verdict(summary)
    write_outputs(run, doc, args.render, args.markdown, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
