"""Sequence-mode perf_analyzer sweeps against ``diarizer_<preset>`` (gRPC), saved as CSV.

Two sweeps per preset, one perf_analyzer run per level:

- **concurrency**: ``--concurrency-range C``: C streams, each sending its next step as soon as the
  previous answer is back (unpaced: the server's throughput and latency under back-to-back load);
- **rate** (live-stream emulation): ``--request-rate-range N/step_seconds --num-of-sequences N
  --serial-sequences``: N streams at a total of N steps per step duration, i.e. each stream at real
  time on average (perf_analyzer spreads the requests evenly, it does not pace each stream; judge
  real-time capacity with the paced locust users, ``python -m loadtest.locust.run``).

Every run uses user-provided streams (``make_input_data``: every step of a conversation, flush steps
included, END on the last) and a fresh random block of sequence ids (``--sequence-id-range``). Output
validation is NOT enabled: perf_analyzer's end-of-run END request may carry a later step's data.

perf_analyzer is the binary of the tritonclient 2.51 wheel in this environment's ``bin/``. It needs
``libb64.so.0d`` and ``libcudart.so.12``: both ship, under hashed names, in the nvidia-pytriton wheel's
``nvidia_pytriton.libs/``; they are symlinked under their plain names into a private directory put on
``LD_LIBRARY_PATH`` (``build/perf_analyzer_libs/``).

    python -m loadtest.perf_analyzer.run --model-repository build/tiny/local --preset low
    python -m loadtest.perf_analyzer.run --url 127.0.0.1:8001 --preset all --concurrency 1,2,4,8 --streams 1,4,16
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from sortformer_triton import contract
from sortformer_triton.presets import Preset

from ..common import (REPO_ROOT, add_server_arguments, machine_info, parse_int_list, parse_presets, random_sequence_base,
                      results_dir, serve, timestamp)
from .make_input_data import write_input_data

LIBS_DIR = REPO_ROOT / "build" / "perf_analyzer_libs"
# plain name perf_analyzer links against -> glob of the hashed file in nvidia_pytriton.libs/
NEEDED_LIBS: Dict[str, str] = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}

# perf_analyzer's --sequence-id-range is parsed with stoi (int32): keep the block inside it.
PA_SEQUENCE_ID_MIN = 1 << 20
PA_SEQUENCE_ID_MAX = (1 << 31) - 1
MODES = ("concurrency", "rate")
UNSTABLE_MARK = "Failed to obtain stable measurement"


class PerfAnalyzerError(RuntimeError):
    pass


# ---- locating the binary and its libraries --------------------------------------------------------
def find_perf_analyzer() -> Path:
    """The perf_analyzer next to this interpreter (the venv's bin/), else the one on PATH."""
    here = Path(sys.executable).parent / "perf_analyzer"
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise PerfAnalyzerError(
        f"no perf_analyzer next to {sys.executable} nor on PATH: pip install 'tritonclient[grpc,http]==2.51.0' "
        "(later wheels' binaries need glibc 2.38; the PyPI 'perf-analyzer' package is an empty placeholder)")


def pytriton_libs_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise PerfAnalyzerError("nvidia-pytriton is not installed: its wheel ships libb64/libcudart for perf_analyzer")
    libs = Path(list(spec.submodule_search_locations)[0]).parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        raise PerfAnalyzerError(f"no {libs} (expected in the nvidia-pytriton wheel)")
    return libs


def prepare_libs(libs_dir: Path = LIBS_DIR) -> Path:
    """Symlink the wheel's hashed libb64/libcudart under their plain names into ``libs_dir``."""
    source = pytriton_libs_dir()
    libs_dir.mkdir(parents=True, exist_ok=True)
    for plain, pattern in NEEDED_LIBS.items():
        matches = sorted(source.glob(pattern))
        if not matches:
            raise PerfAnalyzerError(f"no {pattern} in {source}")
        link = libs_dir / plain
        if link.is_symlink() and Path(os.readlink(link)) == matches[-1]:
            continue
        tmp = libs_dir / f".{plain}.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(matches[-1])
        os.replace(tmp, link)  # atomic: parallel runs may race here
    return libs_dir


def perf_analyzer_env(libs_dir: Path) -> Dict[str, str]:
    env = dict(os.environ)
    parts = [str(libs_dir)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    return env


# ---- one run ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    measurement_interval_ms: int = 3000
    stability_percentage: int = 25
    max_trials: int = 10
    streaming: bool = False  # gRPC bidirectional streaming API instead of unary calls
    timeout_s: float = 600.0
    extra_args: Sequence[str] = ()


@dataclasses.dataclass
class LevelResult:
    preset: str
    mode: str
    level: int  # concurrency, or streams in rate mode
    request_rate: Optional[float]
    returncode: int
    unstable: bool
    seconds: float
    csv_path: Path
    log_path: Path
    row: Optional[Dict[str, str]]  # perf_analyzer's CSV row (None when it wrote none)
    command: List[str]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.row is not None


def live_rate(preset: Preset, streams: int) -> float:
    """Requests per second of ``streams`` real-time streams: one step per step duration each."""
    return streams / preset.step_seconds


def id_block(level: int) -> int:
    """Sequence ids per run: far more than the streams open at once (perf_analyzer cycles through them)."""
    return max(1000, 4 * level)


def build_command(binary: Path, url: str, preset: Preset, input_data: Path, mode: str, level: int,
                  csv_path: Path, settings: Settings, id_base: int) -> List[str]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cmd = [
        str(binary),
        "-m", contract.ensemble_name(preset),
        "-i", "grpc", "-u", url,
        "--input-data", str(input_data),
        f"--sequence-id-range={id_base}:{id_base + id_block(level)}",
        "-s", str(settings.stability_percentage),
        "-p", str(settings.measurement_interval_ms),
        "-r", str(settings.max_trials),
        "-f", str(csv_path),
    ]
    if mode == "concurrency":
        cmd += ["--concurrency-range", str(level)]
    else:
        cmd += ["--request-rate-range", f"{live_rate(preset, level):.6g}", "--num-of-sequences", str(level),
                "--serial-sequences"]
    if settings.streaming:
        cmd.append("--streaming")
    cmd += list(settings.extra_args)
    return cmd


def read_csv_row(path: Path) -> Optional[Dict[str, str]]:
    """The (single) result row of a perf_analyzer ``-f`` CSV, or None."""
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if any(v.strip() for v in r.values() if v)]
    return rows[0] if rows else None


def run_logged(cmd: Sequence[str], log_path: Path, libs_dir: Path, timeout_s: float) -> int:
    """Run perf_analyzer ``cmd`` with its private libraries, its output (after the command line) in
    ``log_path``; the exit code, 124 when it was killed after ``timeout_s``."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            return subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=perf_analyzer_env(libs_dir),
                                  timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[run.py] perf_analyzer killed after {timeout_s:.0f} s\n")
            return 124


def run_level(url: str, preset: Preset, input_data: Path, mode: str, level: int, out_dir: Path,
              settings: Settings, binary: Optional[Path] = None, libs_dir: Optional[Path] = None,
              quiet: bool = False) -> LevelResult:
    """One perf_analyzer run at one concurrency (or stream count), its CSV and log in ``out_dir``."""
    binary = binary or find_perf_analyzer()
    libs_dir = libs_dir or prepare_libs()
    stem = f"{contract.ensemble_name(preset)}_{mode}_{level}"
    csv_path, log_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.log"
    if csv_path.exists():
        csv_path.unlink()
    id_base = random_sequence_base(id_block(level), PA_SEQUENCE_ID_MIN, PA_SEQUENCE_ID_MAX)
    cmd = build_command(binary, url, preset, input_data, mode, level, csv_path, settings, id_base)
    t0 = time.monotonic()
    code = run_logged(cmd, log_path, libs_dir, settings.timeout_s)
    seconds = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    result = LevelResult(
        preset=preset.name, mode=mode, level=level,
        request_rate=live_rate(preset, level) if mode == "rate" else None,
        returncode=code, unstable=UNSTABLE_MARK in text, seconds=seconds, csv_path=csv_path,
        log_path=log_path, row=read_csv_row(csv_path), command=cmd)
    if not quiet:
        print(_describe(result), flush=True)
    return result


def _describe(r: LevelResult) -> str:
    what = f"{r.preset:>9} {r.mode:<11} {r.level:>4}"
    if r.ok:
        row = r.row or {}
        return (f"{what}: {float(row['Inferences/Second']):8.2f} infer/s, p50 {int(row['p50 latency']) / 1000:8.1f} ms, "
                f"p99 {int(row['p99 latency']) / 1000:8.1f} ms  ({r.seconds:.0f} s)")
    why = "unstable (raise -p or -s)" if r.unstable else f"perf_analyzer exit {r.returncode}"
    return f"{what}: FAILED, {why}; log {r.log_path}"


# ---- sweeps ----------------------------------------------------------------------------------------
def write_merged_csv(results: Sequence[LevelResult], path: Path) -> Path:
    """One CSV per sweep: perf_analyzer's columns behind Preset, Mode, Level, Request Rate, Status."""
    pa_columns: List[str] = []
    for r in results:
        for key in (r.row or {}):
            if key not in pa_columns:
                pa_columns.append(key)
    header = ["Preset", "Mode", "Level", "Live Request Rate", "Status"] + pa_columns
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in results:
            status = "ok" if r.ok else ("unstable" if r.unstable else f"exit {r.returncode}")
            rate = "" if r.request_rate is None else f"{r.request_rate:.6g}"
            writer.writerow([r.preset, r.mode, r.level, rate, status] + [(r.row or {}).get(c, "") for c in pa_columns])
    return path


def sweep(url: str, preset: Preset, mode: str, levels: Sequence[int], out_dir: Path, settings: Settings,
          input_data: Path, stop_on_failure: bool = False) -> List[LevelResult]:
    binary, libs = find_perf_analyzer(), prepare_libs()
    results = []
    for level in levels:
        result = run_level(url, preset, input_data, mode, level, out_dir, settings, binary, libs)
        results.append(result)
        if stop_on_failure and not result.ok:
            break
    write_merged_csv(results, out_dir / f"{contract.ensemble_name(preset)}_{mode}.csv")
    return results


def check_binary() -> str:
    """``perf_analyzer --version`` with the private libs (fails loudly when they do not resolve)."""
    binary, libs = find_perf_analyzer(), prepare_libs()
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                          env=perf_analyzer_env(libs), timeout=30, check=False)
    if proc.returncode != 0:
        raise PerfAnalyzerError(f"{binary} --version failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return (proc.stdout or proc.stderr).strip()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.perf_analyzer.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(ap, "gRPC host:port of a running server (e.g. 127.0.0.1:8001)")
    ap.add_argument("--mode", choices=[*MODES, "both"], default="both")
    ap.add_argument("--concurrency", default="1,2,4,8", help="concurrency levels: 1,2,4 or start:end:step (default %(default)s)")
    ap.add_argument("--streams", default="1,2,4,8",
                    help="rate sweep: live streams N, rate = N / step duration (default %(default)s)")
    ap.add_argument("-p", "--measurement-interval", type=int, default=3000, help="ms per window (default %(default)s)")
    ap.add_argument("-s", "--stability-percentage", type=int, default=25, help="default %(default)s (2-core machines)")
    ap.add_argument("-r", "--max-trials", type=int, default=10)
    ap.add_argument("--streaming", action="store_true", help="gRPC streaming API (--streaming)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per perf_analyzer run (default %(default)s)")
    ap.add_argument("--data-streams", type=int, default=4, help="distinct streams in the input data (default 4)")
    ap.add_argument("--seconds", type=float, default=None, help="audio per stream (default: per preset)")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default results/perf_analyzer/<time>)")
    ap.add_argument("--stop-on-failure", action="store_true", help="end a sweep at its first failed level")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any level is unstable too")
    ap.add_argument("pa_args", nargs="*", help="extra perf_analyzer arguments after --")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    presets = parse_presets(args.preset)
    out = results_dir("perf_analyzer", args.out or (REPO_ROOT / "results" / "perf_analyzer" / timestamp()))
    settings = Settings(args.measurement_interval, args.stability_percentage, args.max_trials, args.streaming,
                        args.timeout, tuple(args.pa_args))
    modes = list(MODES) if args.mode == "both" else [args.mode]
    levels = {"concurrency": parse_int_list(args.concurrency), "rate": parse_int_list(args.streams)}
    print(f"perf_analyzer: {check_binary()}; results in {out}", flush=True)
    all_results: List[LevelResult] = []
    with serve(args.url, args.model_repository,
               log_path=out / "tritonserver.log" if args.model_repository else None) as endpoint:
        url = endpoint.grpc
        for preset in presets:
            data = write_input_data(out / "input_data", preset, args.data_streams, args.seconds)
            for mode in modes:
                all_results += sweep(url, preset, mode, levels[mode], out, settings, data, args.stop_on_failure)
    meta = {
        "machine": machine_info(),
        "url": args.url, "model_repository": str(args.model_repository) if args.model_repository else None,
        "settings": dataclasses.asdict(settings),
        "runs": [{"preset": r.preset, "mode": r.mode, "level": r.level, "returncode": r.returncode,
                  "unstable": r.unstable, "seconds": round(r.seconds, 1), "csv": r.csv_path.name,
                  "command": r.command} for r in all_results],
    }
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    hard = [r for r in all_results if not r.ok and not r.unstable]
    unstable = [r for r in all_results if r.unstable]
    print(f"wrote {out}: {len(all_results) - len(hard) - len(unstable)} ok, {len(unstable)} unstable, "
          f"{len(hard)} failed", flush=True)
    return 1 if hard or (args.strict and unstable) else 0


if __name__ == "__main__":
    sys.exit(main())
