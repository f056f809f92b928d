"""Batch throughput: the offline Sortformer v1 (``diarizer_offline``) next to a streaming preset, in one run.

    python -m export --model full --preset very_high --offline-model full --out build/full_offline --flavour local
    python -m loadtest.offline_throughput --model-repository build/full_offline/local --files 8 --seconds 60 \\
        --concurrency 4 --markdown docs/benchmarks.md

The same ``--files`` synthetic conversations (``sortformer_triton.samples.conversation``, ``--seconds`` each,
2-4 speakers) go through both paths of the client library, ``--concurrency`` recordings at a time: one
request per recording to ``diarizer_offline`` (``DiarizationClient.diarize_offline``: the server's dynamic
batcher joins recordings of the same padded length), and one stream per recording through
``diarizer_<preset>`` (``DiarizationClient.diarize``, default ``very_high``, Curator's streaming
configuration). The paths alternate ``--rounds`` times and each figure is the best round's, so a noisy
neighbour on a shared machine hurts both alike. Printed per path: wall seconds, files per minute, the
real-time factor (wall / audio seconds: below 1 is faster than real time), and the ratio to the streaming
path; with ``--markdown`` the table goes into that file between ``<!-- BEGIN offline_throughput -->`` markers.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from clients.sortformer_client import DiarizationClient
from sortformer_triton.samples import conversation

from .common import add_server_arguments, load_average, machine_info, parse_presets, replace_marked_section, serve

MARKER = "offline_throughput"


def recordings(files: int, seconds: float, seed: int = 0) -> List[np.ndarray]:
    return [conversation(seconds, n_speakers=2 + i % 3, seed=seed + i)[0] for i in range(files)]


def run_offline(client: DiarizationClient, audios: Sequence[np.ndarray], concurrency: int) -> float:
    t0 = time.perf_counter()
    results = client.diarize_offline(audios, concurrency=concurrency)
    wall = time.perf_counter() - t0
    assert all(r.finished and r.n_frames > 0 for r in results)
    return wall


def run_streaming(client: DiarizationClient, audios: Sequence[np.ndarray], concurrency: int) -> float:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(client.diarize, audios))
    wall = time.perf_counter() - t0
    assert all(r.finished for r in results)
    return wall


def measure(url: str, preset: str, audios: Sequence[np.ndarray], concurrency: int, rounds: int) -> Dict[str, float]:
    best = {"offline": float("inf"), "streaming": float("inf")}
    with DiarizationClient(url, preset=preset, timeout=600.0, max_in_flight=1) as client:
        client.check()
        client.check_offline()
        run_offline(client, audios[:1], 1)  # warm-up: first sessions, thread pools
        client.diarize(audios[0])
        for r in range(rounds):
            for path, fn in (("offline", run_offline), ("streaming", run_streaming)):
                wall = fn(client, audios, concurrency)
                best[path] = min(best[path], wall)
                print(f"round {r + 1}/{rounds} {path}: {wall:.1f} s (load {load_average():.1f})", flush=True)
    return best


def models_line(repository: Optional[Path]) -> str:
    """What the repository serves (its export_info.json), for the table's caption."""
    if repository is None or not (Path(repository) / "export_info.json").is_file():
        return "models: a running server (--url)"
    info = json.loads((Path(repository) / "export_info.json").read_text())
    off = info.get("offline") or {}

    def one(d: dict) -> str:
        kind = "random init" if d.get("random_init") else "weights"
        return f"`{d.get('source')}` ({kind}, {int(d.get('parameters', 0)) / 1e6:.1f}M parameters)"

    return f"models: streaming {one(info)}, offline {one(off)}, up to {int(off.get('max_samples', 0)) / 16000:g} s"


def markdown(best: Dict[str, float], preset: str, files: int, seconds: float, concurrency: int,
             rounds: int, models: str = "") -> str:
    audio_s = files * seconds
    info = machine_info()
    rows = ["| path | wall s | files / min | real-time factor | speed vs streaming |", "|---|---|---|---|---|"]
    for path, label in (("offline", "offline v1 (`diarizer_offline`)"), ("streaming", f"streaming `{preset}`")):
        wall = best[path]
        rows.append(f"| {label} | {wall:.1f} | {files / wall * 60:.1f} | {wall / audio_s:.3f} | "
                    f"{best['streaming'] / wall:.2f}x |")
    return "\n".join([
        f"## Offline v1 vs streaming `{preset}`: batch throughput",
        "",
        f"`python -m loadtest.offline_throughput`: {files} synthetic conversations of {seconds:g} s "
        f"({audio_s / 60:.1f} min of audio), {concurrency} at a time through the local server, best of {rounds} "
        f"alternating rounds; {info['cpu_model']}, {info['nproc']} CPUs, {info['date_utc']}; {models}. One request "
        "per recording against one stream per recording (its preset steps and flush steps); the server batches "
        "both (dynamic batching of recordings vs sequence batching of streams).",
        "",
        *rows,
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.offline_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(ap, "a running server's gRPC host:port", preset_help="the streaming preset (default very_high)")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each recording (at most the offline limit)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--markdown", type=Path, default=None, help="put the table into this file (docs/benchmarks.md)")
    args = ap.parse_args(argv)
    presets = parse_presets(args.preset, default="very_high")
    if len(presets) != 1:
        ap.error("give exactly one --preset")
    if args.files < 1 or args.seconds <= 0 or args.concurrency < 1 or args.rounds < 1:
        ap.error("--files, --seconds, --concurrency and --rounds must be positive")
    audios = recordings(args.files, args.seconds)
    with serve(args.url, args.model_repository) as endpoint:
        best = measure(endpoint.grpc, presets[0].name, audios, args.concurrency, args.rounds)
    table = markdown(best, presets[0].name, args.files, args.seconds, args.concurrency, args.rounds,
                     models_line(args.model_repository))
    print(table)
    if args.markdown is not None:
        replace_marked_section(args.markdown, MARKER, table, "Benchmarks")
        print(f"wrote the table into {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
