"""``python -m export.bench``: the exported step in onnxruntime against NeMo's torch step, per preset.

Both run the same model, the same audio and the same steady state (speaker cache and FIFO full, where
a long stream spends its life) with the same thread count, in one run, alternating step by step so load
from other processes hits both alike. Prints, per preset and engine,
mean/p50/p95 ms per step, the real-time factor (step time / step audio duration), peak RSS of a fresh
process running only that engine, the ratio NeMo/ONNX, and the step's FLOPs as a fraction of this CPU's
measured fp32 GEMM throughput. ``--markdown FILE`` writes the table with date and machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from sortformer_triton import contract
from sortformer_triton.presets import PRESETS, Preset

ROOT = Path(__file__).resolve().parents[1]


def gemm_gflops(threads: int, n: int = 1024, repeats: int = 20) -> float:
    """This CPU's fp32 GEMM throughput with `threads` threads (torch/MKL-DNN sgemm, best of runs)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def steady_state(preset: Preset, emb_dim: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Speaker cache and FIFO full (the state every long stream reaches), batch 1."""
    rng = np.random.default_rng(seed)
    f = max(preset.fifo_len, 1)
    return {
        "spkcache": rng.standard_normal((1, preset.spkcache_len, emb_dim)).astype(np.float32),
        "spkcache_preds": rng.uniform(0, 1, (1, preset.spkcache_len, 4)).astype(np.float32),
        "spkcache_lengths": np.array([[preset.spkcache_len]], np.int64),
        "fifo": rng.standard_normal((1, f, emb_dim)).astype(np.float32),
        "fifo_lengths": np.array([[preset.fifo_len]], np.int64),
        "mean_sil_emb": rng.standard_normal((1, emb_dim)).astype(np.float32),
        "n_sil_frames": np.array([[10]], np.int64),
    }


def windows(model, preset: Preset, steps: int) -> List[np.ndarray]:
    """Full feature windows (left ctx + chunk + right ctx) cut from NeMo features of a conversation."""
    from sortformer_triton.samples import conversation

    from .reference import nemo_features

    seconds = (steps + 2) * preset.step_seconds + preset.latency_seconds + 1
    feats = nemo_features(model, conversation(seconds, 3, seed=5)[0])
    w, c = preset.window_mel_frames, preset.chunk_mel_frames
    return [feats[k * c : k * c + w][None] for k in range(1, steps + 1)]


def engine_steps(model, preset: Preset, onnx_path: str, threads: int):
    """Two callables that each run one steady-state step on the same window and state: NeMo and ONNX."""
    import torch

    from sortformer_triton.inprocess import profile_feeds

    from .reference import configure_streaming, ort_fn

    configure_streaming(model, preset)
    emb_dim = int(model.cfg.encoder.d_model)
    win = windows(model, preset, 1)[0]
    state = steady_state(preset, emb_dim)
    feeds = dict(state)
    feeds.update({contract.FEATURES: win, contract.FEATURE_LENGTH: np.array([[win.shape[1]]], np.int64),
                  contract.LEFT_CONTEXT: np.array([[preset.left_context]], np.int64),
                  contract.CHUNK_INDEX: np.array([[1]], np.int64), contract.START: np.zeros((1, 1), np.int32)})
    feeds.update(profile_feeds([None], [0]))
    fn = ort_fn(onnx_path, threads=threads)
    mods = model.sortformer_modules
    x = torch.from_numpy(win)

    def onnx_step() -> None:
        fn(feeds)

    @torch.no_grad()
    def nemo_step() -> None:
        st = mods.init_streaming_state(batch_size=1, async_streaming=True)
        for name in ("spkcache", "spkcache_preds", "fifo", "mean_sil_emb"):
            setattr(st, name, torch.from_numpy(state[name]))
        st.spkcache_lengths = torch.from_numpy(state["spkcache_lengths"][:, 0])
        st.fifo_lengths = torch.from_numpy(state["fifo_lengths"][:, 0])
        st.n_sil_frames = torch.from_numpy(state["n_sil_frames"][:, 0])
        model.forward_streaming_step(
            processed_signal=x, processed_signal_length=torch.tensor([x.shape[1]]), streaming_state=st,
            total_preds=torch.zeros((1, 0, 4)), left_offset=preset.left_context * 8,
            right_offset=preset.right_context * 8,
        )

    return {"nemo": nemo_step, "onnx": onnx_step}


def time_engines(steps_fns: Dict, steps: int, warmup: int = 2) -> Dict[str, np.ndarray]:
    """Alternate the engines step by step, so load from other processes hits both alike."""
    for _ in range(warmup):
        for fn in steps_fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in steps_fns}
    for _ in range(steps):
        for name, fn in steps_fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: np.array(v) * 1000 for k, v in times.items()}


def peak_rss_mb(engine: str, source: str, preset: Preset, threads: int, onnx_path: str) -> float:
    """Peak RSS of a fresh process that loads what one engine needs and runs two steps."""
    import torch

    from .models import load_model

    torch.set_num_threads(threads)
    if engine == "onnx":
        from sortformer_triton.inprocess import profile_feeds

        from .reference import ort_fn

        emb_dim = 512 if source == "full" else int(load_model(source).cfg.encoder.d_model)
        feeds = steady_state(preset, emb_dim)
        w = preset.window_mel_frames
        feeds.update({contract.FEATURES: np.zeros((1, w, 128), np.float32),
                      contract.FEATURE_LENGTH: np.array([[w]], np.int64),
                      contract.LEFT_CONTEXT: np.array([[preset.left_context]], np.int64),
                      contract.CHUNK_INDEX: np.array([[1]], np.int64), contract.START: np.zeros((1, 1), np.int32)})
        feeds.update(profile_feeds([None], [0]))
        fn = ort_fn(onnx_path, threads=threads)
        fn(feeds)
        fn(feeds)
    else:
        model = load_model(source)
        fns = engine_steps(model, preset, onnx_path, threads)
        fns["nemo"]()
        fns["nemo"]()
    return _vm_hwm_mb()


def _vm_hwm_mb() -> float:
    """This process's peak resident memory. (ru_maxrss survives exec: a child would report its parent's.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_flops(model, preset: Preset) -> float:
    """FLOPs of one steady-state step, counted by torch on the exported step module."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .graphs import StreamingStep
    from .reference import configure_streaming

    configure_streaming(model, preset)
    module = StreamingStep(model, preset).eval()
    emb_dim = module.D
    state = steady_state(preset, emb_dim)
    w = preset.window_mel_frames
    args = [torch.zeros(1, w, 128), torch.tensor([[w]]), torch.tensor([[preset.left_context]]), torch.tensor([[1]]),
            torch.zeros(1, 1), torch.zeros(1, contract.PROFILE_HEADER_LEN, dtype=torch.int64),
            torch.zeros(1, 1, dtype=torch.int32)] + [torch.from_numpy(state[s.name]) for s in contract.sortformer_io(preset, emb_dim).states]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return float(counter.get_total_flops())


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", help="full (default: random init of the real size), tiny, .nemo, HF id")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable; default all")
    ap.add_argument("--steps", type=int, default=10, help="timed steady-state steps per engine (default 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--_engine", help=argparse.SUPPRESS)
    ap.add_argument("--_onnx", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._engine:  # child process: peak RSS of one engine
        print(json.dumps({"peak_rss_mb": peak_rss_mb(args._engine, args.model, PRESETS[args.preset[0]], args.threads, args._onnx)}))
        return 0

    import torch

    from .models import load_model
    from .onnx_export import export_step

    torch.set_num_threads(args.threads)
    gemm = gemm_gflops(args.threads)
    model = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.preset or PRESETS:
            p = PRESETS[name]
            path = export_step(model, p, Path(tmp) / f"{name}.onnx", args.model)
            flops = step_flops(model, p)
            times = time_engines(engine_steps(model, p, str(path), args.threads), args.steps)
            res = {}
            for engine in ("nemo", "onnx"):
                cmd = [sys.executable, "-m", "export.bench", "--model", args.model, "--preset", name,
                       "--threads", str(args.threads), "--_engine", engine, "--_onnx", str(path)]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
                t = times[engine]
                res[engine] = {"engine": engine, "mean_ms": float(t.mean()), "p50_ms": float(np.percentile(t, 50)),
                               "p95_ms": float(np.percentile(t, 95)), "steps": int(t.size),
                               **json.loads(out.strip().splitlines()[-1])}
            for engine in ("nemo", "onnx"):
                r = res[engine]
                r.update(preset=name, rtf=r["mean_ms"] / 1000 / p.step_seconds, gflop=flops / 1e9,
                         gemm_fraction=flops / (r["mean_ms"] / 1000) / (gemm * 1e9),
                         nemo_over_onnx=res["nemo"]["mean_ms"] / res["onnx"]["mean_ms"])
                rows.append(r)
                print(json.dumps(r), flush=True)
            path.unlink()
    table = ["| preset | engine | mean ms | p50 ms | p95 ms | RTF | peak RSS MB | GFLOP/step | of GEMM peak | NeMo/ONNX |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['preset']} | {r['engine']} | {r['mean_ms']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['rtf']:.3f} | {r['peak_rss_mb']:.0f} | {r['gflop']:.1f} | {100 * r['gemm_fraction']:.0f}% | "
                     f"{r['nemo_over_onnx']:.2f} |")
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; model `{args.model}`; {args.threads} threads; "
              f"fp32 GEMM {gemm:.0f} GFLOP/s; steady state (speaker cache and FIFO full); {args.steps} timed steps.")
    text = header + "\n\n" + "\n".join(table) + "\n"
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
