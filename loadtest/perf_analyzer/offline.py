"""perf_analyzer against ``diarizer_offline`` (the offline Sortformer v1: one request per recording, no sequences).

    python -m loadtest.perf_analyzer.offline --model-repository build/tiny/local --concurrency 1,2,4
    python -m loadtest.perf_analyzer.offline --url 127.0.0.1:8001 --recordings 8 --seconds 30

The ``--input-data`` document holds ``--recordings`` synthetic conversations, each one request as the client
library sends it (``clients.sortformer_client.offline``): AUDIO zero-padded to the 5 s bucket
(``offline.padded_length``), AUDIO_LENGTH its valid samples. All recordings have the same length so perf_analyzer
can send them at any concurrency and Triton's dynamic batcher can join them (it batches equal shapes only).
One perf_analyzer run per concurrency level (``--concurrency-range``), CSV and log per level, a merged CSV
and ``run.json`` in ``--out`` (default results/perf_analyzer/offline-<time>); the runner pieces (binary, its
private libraries, CSV reading) are ``loadtest.perf_analyzer.run``'s.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from sortformer_triton import contract, offline
from sortformer_triton.presets import SAMPLE_RATE
from sortformer_triton.samples import conversation

from ..common import REPO_ROOT, machine_info, parse_int_list, results_dir, serve, timestamp
from .make_input_data import _tensor
from .run import Settings, find_perf_analyzer, prepare_libs, read_csv_row, run_logged


def input_data(recordings: int = 4, seconds: float = 20.0, seed: int = 0) -> Dict[str, object]:
    """``{"data": [request, ...]}``: one request per recording (``recordings`` distinct conversations)."""
    if recordings < 1 or seconds <= 0:
        raise ValueError(f"recordings must be >= 1 and seconds > 0, got {recordings}, {seconds}")
    n = int(seconds * SAMPLE_RATE)
    padded = offline.padded_length(n)
    out = []
    for i in range(recordings):
        audio = np.zeros(padded, np.float32)
        speech = conversation(seconds, n_speakers=2 + i % 3, seed=seed + 1000 * i)[0][:n]
        audio[: speech.size] = speech
        out.append({contract.AUDIO: _tensor(audio, "b64"), contract.AUDIO_LENGTH: {"content": [n], "shape": [1]}})
    return {"data": out}


def build_command(binary: Path, url: str, input_data_path: Path, concurrency: int, csv_path: Path,
                  settings: Settings) -> List[str]:
    cmd = [str(binary), "-m", offline.ENSEMBLE, "-i", "grpc", "-u", url, "--input-data", str(input_data_path),
           "--concurrency-range", str(concurrency), "-s", str(settings.stability_percentage),
           "-p", str(settings.measurement_interval_ms), "-r", str(settings.max_trials), "-f", str(csv_path)]
    if settings.streaming:
        cmd.append("--streaming")
    return cmd + list(settings.extra_args)


def run_levels(url: str, data: Path, levels: Sequence[int], out: Path, settings: Settings) -> List[Dict[str, object]]:
    binary, libs = find_perf_analyzer(), prepare_libs()
    runs = []
    for level in levels:
        csv_path, log_path = out / f"{offline.ENSEMBLE}_concurrency_{level}.csv", out / f"{offline.ENSEMBLE}_concurrency_{level}.log"
        cmd = build_command(binary, url, data, level, csv_path, settings)
        t0 = time.monotonic()
        code = run_logged(cmd, log_path, libs, settings.timeout_s)
        row = read_csv_row(csv_path)
        runs.append({"concurrency": level, "returncode": code, "seconds": round(time.monotonic() - t0, 1),
                     "row": row, "csv": csv_path.name, "command": cmd})
        what = (f"{float(row['Inferences/Second']):.2f} recordings/s, p50 {int(row['p50 latency']) / 1000:.0f} ms"
                if code == 0 and row else f"FAILED (exit {code}); log {log_path}")
        print(f"{offline.ENSEMBLE} concurrency {level:>3}: {what}", flush=True)
    with open(out / f"{offline.ENSEMBLE}_concurrency.csv", "w", newline="") as fh:
        columns = sorted({k for r in runs for k in (r["row"] or {})})
        writer = csv.writer(fh)
        writer.writerow(["Level", "Status"] + columns)
        for r in runs:
            writer.writerow([r["concurrency"], "ok" if r["returncode"] == 0 and r["row"] else f"exit {r['returncode']}"]
                            + [(r["row"] or {}).get(c, "") for c in columns])
    return runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.perf_analyzer.offline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server's gRPC host:port")
    where.add_argument("--model-repository", type=Path, help="start the local tritonserver on this repository")
    ap.add_argument("--concurrency", default="1,2,4", help="levels: 1,2,4 or start:end:step (default %(default)s)")
    ap.add_argument("--recordings", type=int, default=4, help="distinct recordings in the input data (default 4)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of every recording (default 20)")
    ap.add_argument("-p", "--measurement-interval", type=int, default=3000, help="ms per window (default %(default)s)")
    ap.add_argument("-s", "--stability-percentage", type=int, default=25)
    ap.add_argument("-r", "--max-trials", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per perf_analyzer run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = results_dir("perf_analyzer", args.out or REPO_ROOT / "results" / "perf_analyzer" / f"offline-{timestamp()}")
    settings = Settings(args.measurement_interval, args.stability_percentage, args.max_trials, False, args.timeout)
    data = out / f"{offline.ENSEMBLE}_{args.recordings}x{args.seconds:g}s.json"
    data.write_text(json.dumps(input_data(args.recordings, args.seconds), separators=(",", ":")))
    with serve(args.url, args.model_repository) as endpoint:
        runs = run_levels(endpoint.grpc, data, parse_int_list(args.concurrency), out, settings)
    (out / "run.json").write_text(json.dumps({"machine": machine_info(), "url": args.url,
                                              "model_repository": str(args.model_repository or ""),
                                              "recordings": args.recordings, "seconds": args.seconds,
                                              "runs": runs}, indent=2, default=str) + "\n")
    return 0 if all(r["returncode"] == 0 and r["row"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
