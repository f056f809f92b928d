"""One benchmark run: capacity, Triton overhead and sequence batching, per preset, with plots.

    python -m loadtest.report --model tiny --docs                 # all presets, updates docs/benchmarks.md
    python -m loadtest.report --model full --preset high --docs   # the full-size architecture, one preset

What one run measures, on this machine, in this order (so every ratio comes from the same run):

1. exports (cached, ``loadtest.models``) two local repositories of the same model: sequence batching on
   (``--max-batch-size 8``) and off (``--max-batch-size 1``), both with enough sequence slots
   (``--max-candidate-sequences``) for the capacity search;
2. **in-process ONNX loop**: the preprocessor and sortformer ONNX files of the batching-on repository,
   run with ``sortformer_triton.inprocess.StatefulGraph`` + ``ort_fn`` (same files, same 2 intra-op threads as the
   local Python-backend runner), streams in lock step: 1 stream, and 8 streams batched per call. (numpy
   and onnxruntime only. The loop has no postprocessor, no gRPC and no scheduling: that is the overhead
   measured.)
3. against the local tritonserver on the batching-on repository, per preset: perf_analyzer at
   concurrency 1 and 8 (sequence mode, ``-s 25 -p 3000``), then the **capacity search**: paced locust
   users (``loadtest.locust``), each a live stream at real time; a stream count passes when there is no
   failure and the p99 step latency stays below the step (chunk) duration. The first count tried comes
   from perf_analyzer's unpaced throughput; the search then grows or bisects (``--capacity-trials``);
4. against the batching-off repository: perf_analyzer at concurrency 8.

Steps 2-4 run preset by preset and interleaved (in-process c1, Triton c1, in-process c8, Triton c8
batching on, Triton c8 batching off, then the capacity search), both servers up at once, so the numbers
a ratio compares are taken minutes apart at most.

Writes ``results/report/<label>/`` (report.json, report.md, PNG plots, every perf_analyzer/locust CSV
and log); ``--docs`` also puts the section and plots into ``docs/benchmarks.md`` / ``docs/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sortformer_triton import contract
from sortformer_triton.local_server import LocalTritonServer
from sortformer_triton.presets import Preset, get_preset
from sortformer_triton.protocol import iter_steps

from .common import REPO_ROOT, load_average, machine_info, parse_presets, replace_marked_section, results_dir
from .locust.run import LocustSummary, run_locust
from .models import ensure_export
from .perf_analyzer.make_input_data import default_seconds, stream_audio, write_input_data
from .perf_analyzer.run import LevelResult, Settings, run_level

DOCS = REPO_ROOT / "docs"
BENCHMARKS_MD = DOCS / "benchmarks.md"
CONCURRENCIES = (1, 8)
BATCHED_MBS, UNBATCHED_MBS = 8, 1
DEFAULT_SLOTS = 128
GROWTH = 1.3
MIN_MEASURE_S = 10.0


# ---- in-process baseline ------------------------------------------------------------------------
@dataclasses.dataclass
class InProcess:
    preset: str
    concurrency: int
    steps: int  # stream-steps timed
    seconds: float
    steps_per_second: float
    step_ms_p50: float  # wall time of one batched step (what each request of the batch waits)
    step_ms_p99: float
    loadavg: float = math.nan  # 1-min load average right after the measurement


def inprocess_loop(preset: Preset, repo: Path, emb_dim: int, concurrency: int, min_seconds: float = 8.0,
                   min_steps: int = 20, max_seconds: float = 60.0, warmup_steps: int = 2,
                   threads: int = 2) -> InProcess:
    """Streams in lock step through the two stateful ONNX graphs, as ``sortformer_triton.inprocess`` does.

    Every global step runs one batched preprocessor call and one batched sortformer call for all
    ``concurrency`` streams; a stream that ends starts again (new id, START), so the batch stays full.
    Timed after ``warmup_steps``, for at least ``min_seconds`` and ``min_steps`` steps (fewer, but at
    least 3, when that would take longer than ``max_seconds``: full-size batches take seconds each).
    """
    from sortformer_triton.inprocess import repository_graphs

    pre, step = repository_graphs(repo, preset, emb_dim, threads)
    seconds = default_seconds(preset)
    plans = [list(iter_steps(preset, stream_audio(i, seconds))) for i in range(concurrency)]
    position = [0] * concurrency
    ids = list(range(1, concurrency + 1))
    next_id = concurrency + 1
    times: List[float] = []
    total = 0
    started = None
    g = 0
    while True:
        reqs = [plans[i][position[i]] for i in range(concurrency)]
        t0 = time.perf_counter()
        pre_out = pre.run(ids, [r.start for r in reqs], {
            contract.AUDIO: np.stack([r.audio for r in reqs]),
            contract.AUDIO_LENGTH: np.array([[r.valid] for r in reqs], dtype=contract.AUDIO_LENGTH_TENSOR.dtype),
        })
        step.run(ids, [r.start for r in reqs], {n: pre_out[n] for n in (
            contract.FEATURES, contract.FEATURE_LENGTH, contract.LEFT_CONTEXT, contract.CHUNK_INDEX)})
        elapsed = time.perf_counter() - t0
        for i, r in enumerate(reqs):
            position[i] += 1
            if r.end:
                pre.end(ids[i])
                step.end(ids[i])
                ids[i], next_id = next_id, next_id + 1
                position[i] = 0
        g += 1
        if g <= warmup_steps:
            continue
        if started is None:
            started = time.perf_counter() - elapsed
        times.append(elapsed)
        total += concurrency
        spent = time.perf_counter() - started
        if spent >= min_seconds and (len(times) >= min_steps or (spent >= max_seconds and len(times) >= 3)):
            break
    wall = sum(times)
    ms = sorted(t * 1000.0 for t in times)
    return InProcess(preset.name, concurrency, total, wall, total / wall, _pct(ms, 50), _pct(ms, 99), load_average())


def _pct(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return math.nan
    return float(ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1])


# ---- perf_analyzer + locust ------------------------------------------------------------------------
@dataclasses.dataclass
class PaPoint:
    preset: str
    repository: str  # "batching" (max_batch_size 8) or "no_batching" (1)
    concurrency: int
    ok: bool
    infer_per_second: float
    p50_ms: float
    p99_ms: float
    csv: str
    loadavg: float = math.nan  # 1-min load average right after the measurement


def pa_point(url: str, preset: Preset, data: Path, concurrency: int, out: Path, label: str,
             settings: Settings) -> PaPoint:
    sub = out / f"pa_{label}"
    sub.mkdir(parents=True, exist_ok=True)
    r: LevelResult = run_level(url, preset, data, "concurrency", concurrency, sub, settings)
    row = r.row or {}
    return PaPoint(preset.name, label, concurrency, r.ok,
                   float(row.get("Inferences/Second", "nan") or "nan"),
                   int(row.get("p50 latency", 0) or 0) / 1000.0 if r.ok else math.nan,
                   int(row.get("p99 latency", 0) or 0) / 1000.0 if r.ok else math.nan,
                   str(r.csv_path.relative_to(out)), load_average())


def capacity_search(url: str, preset: Preset, first: int, cap: int, trials: int, out: Path,
                    log: List[LocustSummary]) -> Dict[str, Any]:
    """Largest stream count with p99 step latency < step duration (paced users), within ``trials``."""
    good, bad = 0, None
    n = max(1, min(first, cap))
    for _ in range(trials):
        warmup = 1.0 + preset.step_seconds  # spawning (all users in 1 s) + the start jitter
        run_time = warmup + max(MIN_MEASURE_S, 1.5 * preset.step_seconds)
        s = run_locust(url, preset, n, run_time, out / "locust", warmup_s=warmup)
        log.append(s)
        if s.realtime:
            good = max(good, n)
            if n >= cap or (bad is not None and bad - good <= 1):
                break
            n = min(cap, max(n + 1, math.ceil(n * GROWTH))) if bad is None else (good + bad) // 2
        else:
            bad = n if bad is None else min(bad, n)
            if n == 1 or bad - good <= 1:
                break
            n = max(1, min(bad - 1, math.floor(n / GROWTH))) if good == 0 else (good + bad) // 2
    return {"preset": preset.name, "sustained": good, "first_failing": bad, "search_cap": cap,
            "trials": [t.users for t in log if t.preset == preset.name]}


def throughput_bound(preset: Preset, pa: Sequence[Dict[str, Any]]) -> int:
    """Streams the server's unpaced throughput can carry at all: max infer/s (batching repository,
    perf_analyzer) x step duration; 0 when perf_analyzer measured nothing.

    N live streams offer N / step_seconds requests per second; above the saturated throughput the queue
    grows without end, even where a short paced run of a long-step preset (10-27 s steps) has not yet
    pushed the p99 latency over one step.
    """
    rates = [x["infer_per_second"] for x in pa
             if x["ok"] and x["preset"] == preset.name and x["repository"] == "batching"]
    return int(math.floor(max(rates) * preset.step_seconds)) if rates else 0


def effective_capacity(cap: Dict[str, Any]) -> Tuple[int, str]:
    """(streams, what limits it): the paced result, never above the throughput bound or the slots."""
    n, why = cap["sustained"], "p99 step latency (paced)"
    bound = cap.get("throughput_bound") or 0
    if bound and n > bound:
        n, why = bound, "unpaced throughput x step"
    elif bound and n == bound and cap.get("first_failing") is None:
        why = "unpaced throughput x step"
    if n >= cap["slot_cap"]:
        n, why = cap["slot_cap"], "sequence slots"
    return n, why


# ---- plots and markdown --------------------------------------------------------------------------
def plot_capacity(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = report["presets"]
    fig, axes = plt.subplots(1, len(presets), figsize=(4.2 * len(presets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], presets):
        runs = sorted((r for r in report["locust"] if r["preset"] == name), key=lambda r: r["users"])
        step_ms = report["step_seconds"][name] * 1000.0
        xs = [r["users"] for r in runs]
        ys = [r["latency_p99_ms"] for r in runs]
        ax.plot(xs, ys, "-", color="0.6", zorder=1)
        ax.scatter(xs, ys, c=["tab:green" if r["realtime"] else "tab:red" for r in runs], zorder=2)
        ax.axhline(step_ms, color="tab:blue", linestyle="--", label=f"step {step_ms:.0f} ms")
        bound = report["capacity"][name].get("throughput_bound")
        if bound:
            ax.axvline(bound, color="tab:orange", linestyle=":", label=f"throughput bound {bound}")
        ax.set_title(f"{name}: {effective_capacity(report['capacity'][name])[0]} streams")
        ax.set_xlabel("live streams (paced)")
        ax.set_ylabel("p99 step latency (ms)")
        ax.set_yscale("log")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Real-time capacity, {report['label']} model (green: p99 < step duration)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = report["presets"]
    series = [
        ("in-process, 1 stream", lambda p: _inproc(report, p, 1)),
        ("Triton, concurrency 1", lambda p: _pa(report, p, "batching", 1)),
        ("in-process, 8 streams", lambda p: _inproc(report, p, 8)),
        ("Triton, conc. 8, batching", lambda p: _pa(report, p, "batching", 8)),
        ("Triton, conc. 8, no batching", lambda p: _pa(report, p, "no_batching", 8)),
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.4 * len(presets)), 4.0))
    width = 0.8 / len(series)
    for k, (label, fn) in enumerate(series):
        values = [fn(p) for p in presets]
        ax.bar([i + k * width for i in range(len(presets))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(presets))], presets)
    ax.set_ylabel("stream-steps per second")
    ax.set_yscale("log")
    ax.set_title(f"Throughput, {report['label']} model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _inproc(report: Dict[str, Any], preset: str, c: int) -> float:
    for r in report["inprocess"]:
        if r["preset"] == preset and r["concurrency"] == c:
            return r["steps_per_second"]
    return math.nan


def _pa(report: Dict[str, Any], preset: str, repo: str, c: int, field: str = "infer_per_second") -> float:
    for r in report["perf_analyzer"]:
        if r["preset"] == preset and r["repository"] == repo and r["concurrency"] == c and r["ok"]:
            return r[field]
    return math.nan


def _f(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _rate(x: float) -> str:
    """Throughputs from 0.3 to 50 steps/s: 3 significant digits."""
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _load(report: Dict[str, Any], kind: str, preset: str, c: int, repo: str = "batching") -> str:
    rows = report["inprocess"] if kind == "inprocess" else [r for r in report["perf_analyzer"] if r["repository"] == repo]
    for r in rows:
        if r["preset"] == preset and r["concurrency"] == c:
            value = r.get("loadavg")
            return "n/r" if value is None or math.isnan(value) else f"{value:.1f}"  # n/r: not recorded
    return "n/r"


def ratios(report: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    out: Dict[str, Dict[str, float]] = {}
    for p in report["presets"]:
        r: Dict[str, float] = {}
        for c in CONCURRENCIES:
            r[f"overhead_throughput_c{c}"] = _inproc(report, p, c) / _pa(report, p, "batching", c)
        inproc_c1 = next((x for x in report["inprocess"] if x["preset"] == p and x["concurrency"] == 1), None)
        r["triton_p50_ms_c1"] = _pa(report, p, "batching", 1, "p50_ms")
        r["inprocess_p50_ms_c1"] = inproc_c1["step_ms_p50"] if inproc_c1 else math.nan
        r["overhead_latency_ms_c1"] = r["triton_p50_ms_c1"] - r["inprocess_p50_ms_c1"]
        r["batching_speedup_c8"] = _pa(report, p, "batching", 8) / _pa(report, p, "no_batching", 8)
        out[p] = r
    return out


def markdown(report: Dict[str, Any], capacity_png: str, throughput_png: str) -> str:
    m = report["machine"]
    rat = report["ratios"]
    lines = [
        f"### Run `{report['label']}`: {report['model']} model, {m['date_utc']}",
        "",
        f"- Machine: {m['nproc']} usable CPUs ({m['cpu_count']} online), {m['cpu_model']}; {m['platform']}; "
        f"Python {m['python']}. 1-min load average {report['loadavg_start']:.2f} at the start, "
        f"{report['loadavg_end']:.2f} at the end (other processes on the machine count in it).",
        f"- Model: `{report['model']}` (random init, {report['parameters'] / 1e6:.2f} M parameters, "
        f"emb_dim {report['emb_dim']}); local tritonserver 2.51 (Python-backend runner of the same ONNX "
        f"graphs); {report['slots']} sequence slots; run took {report['seconds'] / 60:.1f} min.",
        f"- Command: `{report['command']}`",
        "",
        "**Real-time capacity**: paced locust users, one step per step duration; N streams pass with no "
        "failure and p99 step latency < step duration, and N / step duration must not exceed the "
        "server's unpaced throughput (perf_analyzer) — a short paced run of a 10-27 s step preset cannot "
        "show a queue that grows by a fraction of a step per minute.",
        "",
        "| preset | step | **streams sustained** | limited by | largest passing paced run ≤ that: "
        "streams, p99 step latency, p99 lateness | first failing run (p99) | throughput bound | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in report["presets"]:
        cap = report["capacity"][p]
        runs = {r["users"]: r for r in report["locust"] if r["preset"] == p}
        n, why = effective_capacity(cap)
        passing = [u for u, r in runs.items() if r["realtime"] and u <= n]
        ok = runs[max(passing)] if passing else None
        bad = runs.get(cap["first_failing"]) if cap["first_failing"] else None
        lines.append(
            f"| {p} | {report['step_seconds'][p] * 1000:.0f} ms | **{n}** | {why} | "
            + (f"{ok['users']}: {_f(ok['latency_p99_ms'])} ms, {_f(ok['lateness_p99_ms'])} ms" if ok else "none")
            + f" | {cap['first_failing'] or 'none'}{' (' + _f(bad['latency_p99_ms']) + ' ms)' if bad else ''} | "
            f"{cap.get('throughput_bound') or 'n/a'} | {', '.join(str(t) for t in cap['trials'])} |")
    lines += [
        "",
        "**Triton vs the in-process ONNX loop** (same ONNX files, same run; throughput in stream-steps/s; "
        "overhead = in-process throughput / Triton throughput):",
        "",
        "| preset | in-process c1 | Triton c1 | overhead c1 | in-process p50 step | Triton p50 c1 | added per step | "
        "in-process c8 | Triton c8 | overhead c8 | load avg (in-proc c1 / Triton c1 / in-proc c8 / Triton c8) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["presets"]:
        r = rat[p]
        loads = " / ".join([_load(report, "inprocess", p, 1), _load(report, "pa", p, 1),
                            _load(report, "inprocess", p, 8), _load(report, "pa", p, 8)])
        lines.append(
            f"| {p} | {_rate(_inproc(report, p, 1))} | {_rate(_pa(report, p, 'batching', 1))} | "
            f"**{_f(r['overhead_throughput_c1'], 2)}x** | {_f(r['inprocess_p50_ms_c1'])} ms | "
            f"{_f(r['triton_p50_ms_c1'])} ms | {_f(r['overhead_latency_ms_c1'])} ms | "
            f"{_rate(_inproc(report, p, 8))} | {_rate(_pa(report, p, 'batching', 8))} | "
            f"**{_f(r['overhead_throughput_c8'], 2)}x** | {loads} |")
    lines += [
        "",
        "**Sequence batching** (perf_analyzer, concurrency 8, infer/s; max_batch_size 8 vs 1, same run):",
        "",
        "| preset | max_batch_size 1 | max_batch_size 8 | batching on / off | load avg (off / on) |",
        "|---|---|---|---|---|",
    ]
    for p in report["presets"]:
        lines.append(f"| {p} | {_rate(_pa(report, p, 'no_batching', 8))} | {_rate(_pa(report, p, 'batching', 8))} | "
                     f"**{_f(rat[p]['batching_speedup_c8'], 2)}x** | {_load(report, 'pa', p, 8, 'no_batching')} / "
                     f"{_load(report, 'pa', p, 8)} |")
    lines += [
        "",
        f"![capacity: p99 step latency vs paced streams]({capacity_png})",
        f"![throughput: in-process vs Triton, batching on/off]({throughput_png})",
        "",
    ]
    return "\n".join(lines)


def update_docs(report: Dict[str, Any], out: Path) -> Path:
    """Put this run's section (between its markers) and plots into docs/benchmarks.md and docs/."""
    label = report["label"]
    prefix = f"benchmarks_{label}"
    for kind in ("capacity", "throughput"):
        shutil.copy2(out / f"{kind}.png", DOCS / f"{prefix}_{kind}.png")
    section = markdown(report, f"{prefix}_capacity.png", f"{prefix}_throughput.png")
    return replace_marked_section(BENCHMARKS_MD, f"report:{label}", section, "Benchmarks")


# ---- the run -------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="export source: tiny (default), full, or a .nemo file")
    ap.add_argument("--preset", action="append", help="preset(s): repeatable, comma list or 'all' (default all)")
    ap.add_argument("--label", default=None, help="name of this run (default: the model)")
    ap.add_argument("--slots", type=int, default=DEFAULT_SLOTS,
                    help="max_candidate_sequences of the exported models: the most streams tried (default %(default)s)")
    ap.add_argument("--capacity-trials", type=int, default=5, help="locust runs per preset (default %(default)s)")
    ap.add_argument("--pa-interval", type=int, default=3000,
                    help="perf_analyzer -p in ms (default %(default)s; use ~10x the step latency for big models)")
    ap.add_argument("--pa-stability", type=int, default=25, help="perf_analyzer -s (default %(default)s)")
    ap.add_argument("--build", type=Path, default=REPO_ROOT / "build" / "bench", help="export cache root")
    ap.add_argument("--out", type=Path, default=None, help="default results/report/<label>")
    ap.add_argument("--docs", action="store_true", help="update docs/benchmarks.md and docs/benchmarks_<label>_*.png")
    ap.add_argument("--render", type=Path, default=None,
                    help="measure nothing: re-render the markdown, plots (and --docs) of an earlier report.json")
    args = ap.parse_args(argv)
    if args.render is not None:
        return render(args.render, args.docs)
    presets = parse_presets(args.preset or ["all"])
    label = args.label or Path(args.model).stem
    out = results_dir("report", args.out or REPO_ROOT / "results" / "report" / label)
    started, load0 = time.time(), load_average()
    names = [p.name for p in presets]
    print(f"[report] exporting {args.model} ({', '.join(names)}) ...", flush=True)
    repos = {
        "batching": ensure_export(args.build / f"{label}-mb{BATCHED_MBS}", args.model, names, BATCHED_MBS,
                                  args.slots, "local", quiet=False) / "local",
        "no_batching": ensure_export(args.build / f"{label}-mb{UNBATCHED_MBS}", args.model, names, UNBATCHED_MBS,
                                     args.slots, "local", quiet=False) / "local",
    }
    info = json.loads((repos["batching"] / "export_info.json").read_text())
    settings = Settings(measurement_interval_ms=args.pa_interval, stability_percentage=args.pa_stability,
                        max_trials=10, timeout_s=1800.0)
    data = {p.name: write_input_data(out / "input_data", p) for p in presets}

    inprocess: List[InProcess] = []
    pa: List[PaPoint] = []
    locust_runs: List[LocustSummary] = []
    capacity: Dict[str, Dict[str, Any]] = {}
    # Both servers run at once (an idle server costs nothing) so that the measurements each ratio
    # compares are taken back to back: the load of other processes drifts over minutes.
    with LocalTritonServer(repos["batching"], log_path=out / "tritonserver_batching.log") as on, \
            LocalTritonServer(repos["no_batching"], log_path=out / "tritonserver_no_batching.log") as off:
        for p in presets:
            print(f"[report] {p.name}: in-process loop and perf_analyzer, interleaved ...", flush=True)
            for c in CONCURRENCIES:
                r = inprocess_loop(p, repos["batching"], int(info["emb_dim"]), c)
                print(f"  {p.name:>9} in-process c{c}: {r.steps_per_second:8.2f} steps/s, "
                      f"p50 step {r.step_ms_p50:.1f} ms", flush=True)
                inprocess.append(r)
                pa.append(pa_point(on.grpc_url, p, data[p.name], c, out, "batching", settings))
            pa.append(pa_point(off.grpc_url, p, data[p.name], 8, out, "no_batching", settings))
            bound = throughput_bound(p, [dataclasses.asdict(x) for x in pa])
            cap = min(args.slots, bound) if bound else args.slots
            first = max(1, math.floor(0.8 * cap))
            print(f"[report] {p.name}: capacity search from {first} streams (at most {cap}) ...", flush=True)
            capacity[p.name] = capacity_search(on.grpc_url, p, first, cap, args.capacity_trials, out, locust_runs)
            capacity[p.name].update(slot_cap=args.slots, throughput_bound=bound)
            print(f"  {p.name:>9}: {effective_capacity(capacity[p.name])[0]} real-time streams", flush=True)

    report: Dict[str, Any] = {
        "label": label, "model": args.model, "presets": names,
        "command": "python -m loadtest.report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "loadavg_start": load0, "loadavg_end": load_average(),
        "seconds": time.time() - started, "slots": args.slots,
        "parameters": info["parameters"], "emb_dim": info["emb_dim"],
        "step_seconds": {p.name: p.step_seconds for p in presets},
        "inprocess": [dataclasses.asdict(r) for r in inprocess],
        "perf_analyzer": [dataclasses.asdict(r) for r in pa],
        "locust": [s.row() for s in locust_runs],
        "capacity": capacity,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_outputs(report, out, args.docs)
    print(f"[report] wrote {out} in {report['seconds'] / 60:.1f} min", flush=True)
    return 0


def write_outputs(report: Dict[str, Any], out: Path, docs: bool) -> None:
    """Ratios, plots, report.md (and the docs section) from a report dict."""
    for name, cap in report["capacity"].items():
        cap.setdefault("slot_cap", report["slots"])
        if not cap.get("throughput_bound"):
            cap["throughput_bound"] = throughput_bound(get_preset(name), report["perf_analyzer"])
    report["ratios"] = ratios(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot_capacity(report, out / "capacity.png")
    plot_throughput(report, out / "throughput.png")
    text = markdown(report, "capacity.png", "throughput.png")
    (out / "report.md").write_text(text + "\n")
    print(text, flush=True)
    if docs:
        print(f"[report] updated {update_docs(report, out)}", flush=True)


def render(report_json: Path, docs: bool) -> int:
    report = json.loads(Path(report_json).read_text())
    write_outputs(report, Path(report_json).parent, docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
