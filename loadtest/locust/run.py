"""Headless locust runs of paced live streams (``locustfile.py``): CSV, HTML report and a verdict.

For each preset and each user count N: N live streams, each sending one step per step duration (real
time), for ``--run-time`` seconds. Written to the output directory (default ``results/locust/<time>``):

- ``<preset>_u<N>_stats.csv``, ``_stats_history.csv``, ``_failures.csv``, ``_exceptions.csv`` and
  ``<preset>_u<N>.html``: locust's own CSV and HTML reports (step latency and lateness rows);
- ``<preset>_u<N>_steps.csv``: every request (latency, lateness, kind), ``<preset>_u<N>.log``;
- ``summary.csv`` / ``summary.json``: one row per run: step latency and lateness percentiles after a
  warm-up (spawning + one step period), failures, and ``realtime``: no failure and p99 step latency
  below the step (chunk) duration, i.e. the server keeps up with N live streams.

    python -m loadtest.locust.run --model-repository build/tiny/local --preset low --users 1,4,8 --run-time 30
    python -m loadtest.locust.run --url 127.0.0.1:8001 --preset high --users 16 --run-time 120
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from clients.sortformer_client import PROTOCOLS
from sortformer_triton.presets import Preset

from ..common import (REPO_ROOT, add_server_arguments, machine_info, parse_int_list, parse_presets, results_dir, serve,
                      timestamp)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DEFAULT_STOP_TIMEOUT_S = 30
STARTUP_ALLOWANCE_S = 120  # locust import, server check, audio generation; then the hard timeout hits


@dataclasses.dataclass
class LocustSummary:
    preset: str
    users: int
    run_time_s: float
    step_seconds: float
    warmup_s: float
    streams: int
    steps: int  # successful requests counted after the warm-up
    failures: int  # failed requests, whole run
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    lateness_p50_ms: float
    lateness_p99_ms: float
    lateness_max_ms: float
    steps_per_second: float
    returncode: int
    realtime: bool
    prefix: str

    def row(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank (no interpolation); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def read_steps(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def summarize(steps_csv: Path, preset: Preset, users: int, run_time_s: float, warmup_s: float,
              returncode: int = 0, prefix: str = "") -> LocustSummary:
    """Percentiles of the steps sent after ``warmup_s`` (all steps when none were)."""
    rows = read_steps(steps_csv)
    ok = [r for r in rows if r.get("ok") == "1"]
    failures = sum(1 for r in rows if r.get("ok") != "1")
    steady = [r for r in ok if float(r["sent_s"]) >= warmup_s] or ok
    latency = [float(r["latency_ms"]) for r in steady]
    lateness = [float(r["lateness_ms"]) for r in steady if r["kind"] != "flush"]
    span = (max(float(r["sent_s"]) for r in steady) - min(float(r["sent_s"]) for r in steady)) if steady else 0.0
    p99 = percentile(latency, 99)
    realtime = (returncode == 0 and failures == 0 and bool(latency) and p99 < preset.step_seconds * 1000.0)
    return LocustSummary(
        preset=preset.name, users=users, run_time_s=run_time_s, step_seconds=preset.step_seconds,
        warmup_s=warmup_s, streams=len({r["stream"] for r in rows}), steps=len(steady), failures=failures,
        latency_p50_ms=percentile(latency, 50), latency_p90_ms=percentile(latency, 90), latency_p99_ms=p99,
        latency_max_ms=max(latency) if latency else math.nan,
        lateness_p50_ms=percentile(lateness, 50), lateness_p99_ms=percentile(lateness, 99),
        lateness_max_ms=max(lateness) if lateness else math.nan,
        steps_per_second=(len(steady) - 1) / span if span > 0 else math.nan,
        returncode=returncode, realtime=realtime, prefix=prefix)


def default_warmup(preset: Preset, users: int, spawn_rate: float) -> float:
    """Spawning, then one step period (each user's start jitter), then one more step."""
    return users / spawn_rate + 2 * preset.step_seconds


def locust_command(url: str, preset: Preset, users: int, spawn_rate: float, run_time_s: float, prefix: Path,
                   audio_seconds: Optional[float], protocol: str, stop_timeout_s: float,
                   extra: Sequence[str] = ()) -> List[str]:
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{int(math.ceil(run_time_s))}s",
        "--host", f"grpc://{url}" if protocol.startswith("grpc") else f"http://{url}",
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        "--stop-timeout", f"{stop_timeout_s:g}", "--exit-code-on-error", "1",
        "--preset", preset.name, "--protocol", protocol, "--steps-csv", f"{prefix}_steps.csv",
    ]
    if audio_seconds:
        cmd += ["--audio-seconds", f"{audio_seconds:g}"]
    return cmd + list(extra)


def run_locust(url: str, preset: Preset, users: int, run_time_s: float, out_dir: Path,
               spawn_rate: Optional[float] = None, audio_seconds: Optional[float] = None,
               protocol: str = "grpc", warmup_s: Optional[float] = None,
               stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S, extra: Sequence[str] = (),
               quiet: bool = False) -> LocustSummary:
    """One headless locust run; its summary (also printed unless ``quiet``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spawn_rate = spawn_rate or float(max(users, 1))
    prefix = out_dir / f"{preset.name}_u{users}"
    cmd = locust_command(url, preset, users, spawn_rate, run_time_s, prefix, audio_seconds, protocol,
                         stop_timeout_s, extra)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log_path = Path(f"{prefix}.log")
    limit = run_time_s + stop_timeout_s + STARTUP_ALLOWANCE_S
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            code = subprocess.run(cmd, cwd=str(REPO_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=limit, check=False).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[run.py] locust killed after {limit:.0f} s\n")
            code = 124
    summary = summarize(Path(f"{prefix}_steps.csv"), preset, users, run_time_s,
                        default_warmup(preset, users, spawn_rate) if warmup_s is None else warmup_s,
                        code, prefix.name)
    if not quiet:
        print(describe(summary), flush=True)
    return summary


def describe(s: LocustSummary) -> str:
    verdict = "REAL TIME" if s.realtime else "behind real time" if s.returncode == 0 else f"FAILED (exit {s.returncode})"
    return (f"{s.preset:>9} {s.users:>4} streams: {s.steps} steps, {s.failures} failures, step latency p50 "
            f"{s.latency_p50_ms:.1f} / p99 {s.latency_p99_ms:.1f} ms (step {s.step_seconds * 1000:.0f} ms), "
            f"lateness p99 {s.lateness_p99_ms:.1f} ms, max {s.lateness_max_ms:.1f} ms -> {verdict}")


def write_summary(summaries: Sequence[LocustSummary], out_dir: Path, meta: Dict[str, object]) -> None:
    fields = [f.name for f in dataclasses.fields(LocustSummary)]
    with open(out_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for s in summaries:
            writer.writerow(s.row())
    (out_dir / "summary.json").write_text(json.dumps({**meta, "runs": [s.row() for s in summaries]}, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.locust.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(ap, "host:port of a running server (gRPC port unless --protocol http)")
    ap.add_argument("--users", default="2", help="live streams: 4, a list 1,2,4 or start:end:step (default 2)")
    ap.add_argument("--run-time", type=float, default=30.0, help="seconds per run (default %(default)s)")
    ap.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    ap.add_argument("--audio-seconds", type=float, default=None, help="conversation length per stream")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds excluded from the percentiles (default: spawning + two step periods)")
    ap.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT_S)
    ap.add_argument("--out", type=Path, default=None, help="output dir (default results/locust/<time>)")
    ap.add_argument("locust_args", nargs="*", help="extra locust arguments after --")
    args = ap.parse_args(argv)
    out = results_dir("locust", args.out or (REPO_ROOT / "results" / "locust" / timestamp()))
    summaries: List[LocustSummary] = []
    started = time.time()
    with serve(args.url, args.model_repository,
               log_path=out / "tritonserver.log" if args.model_repository else None) as endpoint:
        url = endpoint.for_protocol(args.protocol)
        for preset in parse_presets(args.preset):
            for users in parse_int_list(args.users):
                summaries.append(run_locust(url, preset, users, args.run_time, out, args.spawn_rate,
                                            args.audio_seconds, args.protocol, args.warmup, args.stop_timeout,
                                            tuple(args.locust_args)))
    write_summary(summaries, out, {"machine": machine_info(), "seconds": round(time.time() - started, 1)})
    print(f"wrote {out}", flush=True)
    return 0 if all(s.returncode == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
