"""``python -m loadtest.ort_versions``: the exported graphs in several onnxruntime versions, in one run.

Production (NGC 24.10's onnxruntime backend) runs onnxruntime 1.19.2; this project serves locally with a
newer onnxruntime (requirements.txt) and its tests load every production graph in 1.19.2 as well
(tests/test_validator.py, through ``run_worker``). This benchmark streams one conversation through a repository's
preprocessor and sortformer graphs (``sortformer_triton.inprocess``, the state kept as Triton's implicit
state would) in each requested onnxruntime version and prints, per version: the median and p90 time of
the sortformer step and of the preprocessor step, the ratio to the first version, and the largest
difference of the predictions from the first version's.

Each version runs in a venv of its own (``build/venvs/onnxruntime-<version>``: numpy +
onnxruntime from PyPI, created on first use) unless the running interpreter already has it. The
versions run alternately, ``--rounds`` times each, and every figure is the best round's, so a noisy
neighbour on a shared machine hurts all versions alike.

  python -m loadtest.ort_versions --repository build/full/production --preset low --ort 1.19.2 --ort 1.32.0
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sortformer_triton import contract
from sortformer_triton.presets import get_preset
from sortformer_triton.samples import conversation

from sortformer_triton.venvs import side_venv

from .common import REPO_ROOT, load_average, machine_info, replace_marked_section

NUMPY_PIN = "numpy==1.26.4"
WARMUP_STEPS = 3
MARKER = "ort-versions"


def _emb_dim(root: Path) -> int:
    """The encoder width, from the export_info.json export writes into every flavour (no onnx needed)."""
    return int(json.loads((root / "export_info.json").read_text())["emb_dim"])


def streams(seconds: float, count: int) -> Tuple[List[np.ndarray], List[int]]:
    """``count`` conversations of different lengths (never whole steps) and start steps 0, 2, 1, 3, ..."""
    audios = [conversation(seconds * (1.0 - 0.13 * i) + 0.37 * i, n_speakers=2 + i % 3, seed=7 + i)[0]
              for i in range(count)]
    return audios, [[0, 2, 1, 3][i % 4] for i in range(count)]


def worker(repository: Path, preset_name: str, seconds: float, count: int, threads: int, out: Path) -> None:
    """Stream ``count`` streams (different ages per batch) through the graphs in this interpreter's
    onnxruntime, as Triton's implicit state would; save the step times and every stream's predictions."""
    import onnxruntime as ort

    from sortformer_triton.inprocess import StatefulGraph, ort_fn, stream_through

    preset = get_preset(preset_name)
    times: Dict[str, List[float]] = {"preprocessor": [], "sortformer": []}

    def timed(name: str, fn):
        def run(feeds):
            t0 = time.perf_counter()
            result = fn(feeds)
            times[name].append(time.perf_counter() - t0)
            return result
        return run

    root = Path(repository)

    def graph(name: str, io: contract.ModelIO, kind: str) -> StatefulGraph:
        return StatefulGraph(timed(kind, ort_fn(str(root / name / "1" / "model.onnx"), threads)), io)

    pre = graph(contract.preprocessor_name(preset), contract.preprocessor_io(preset), "preprocessor")
    step = graph(contract.sortformer_name(preset), contract.sortformer_io(preset, _emb_dim(root)), "sortformer")
    audios, start_at = streams(seconds, count)
    results = stream_through(pre, step, preset, audios, start_at)
    np.savez(out, **{f"preds_{i}": r.preds for i, r in enumerate(results)},
             **{k: np.array(v[WARMUP_STEPS:] or v) for k, v in times.items()})
    out.with_suffix(".json").write_text(json.dumps({"onnxruntime": ort.__version__, "streams": count,
                                                    "finished": all(r.finished for r in results)}))


def run_worker(interpreter: Path, repository: Path, preset: str, seconds: float, count: int = 1,
               threads: int = 2) -> Dict[str, object]:
    """``worker`` in another interpreter: {"onnxruntime", "finished", "preds": [per stream], times}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.npz"
        cmd = [str(interpreter), "-m", "loadtest.ort_versions", "--worker", "--repository",
               str(Path(repository).resolve()), "--preset", preset, "--seconds", str(seconds), "--streams",
               str(count), "--threads", str(threads), "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
        meta = json.loads(out.with_suffix(".json").read_text())
        with np.load(out) as data:
            return {**meta, "preds": [data[f"preds_{i}"] for i in range(count)],
                    "sortformer": data["sortformer"], "preprocessor": data["preprocessor"]}


def _current_version() -> Optional[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort.__version__


def interpreter_for(version: str) -> Path:
    """This interpreter if it has onnxruntime ``version``; else a side venv with it (created once)."""
    if _current_version() == version:
        return Path(sys.executable)
    return side_venv(f"onnxruntime-{version}", [NUMPY_PIN, f"onnxruntime=={version}"])


def run(repository: Path, preset_name: str, versions: Sequence[str], seconds: float, threads: int,
        rounds: int) -> List[Dict[str, object]]:
    interpreters = {v: interpreter_for(v) for v in versions}
    best: Dict[str, Dict[str, object]] = {}
    for _ in range(rounds):
        for version in versions:
            data = run_worker(interpreters[version], repository, preset_name, seconds, 1, threads)
            if data["onnxruntime"] != version:
                raise RuntimeError(f"{interpreters[version]} runs onnxruntime {data['onnxruntime']}, not {version}")
            row = {"onnxruntime": version, "finished": data["finished"], "preds": data["preds"][0],
                   "steps": int(data["sortformer"].size), "load": load_average()}
            for name in ("sortformer", "preprocessor"):
                row[f"{name}_median_ms"] = float(np.median(data[name]) * 1e3)
                row[f"{name}_p90_ms"] = float(np.percentile(data[name], 90) * 1e3)
            if version not in best or row["sortformer_median_ms"] < best[version]["sortformer_median_ms"]:
                best[version] = row
    rows = [best[v] for v in versions]
    first = rows[0]
    for row in rows:
        row["ratio_sortformer"] = row["sortformer_median_ms"] / first["sortformer_median_ms"]
        row["ratio_preprocessor"] = row["preprocessor_median_ms"] / first["preprocessor_median_ms"]
        same = row["preds"].shape == first["preds"].shape
        row["max_abs_diff_vs_first"] = float(np.max(np.abs(row["preds"] - first["preds"]))) if same else float("inf")
    return rows


def markdown(rows: Sequence[Dict[str, object]], repository: Path, preset: str, seconds: float, threads: int,
             rounds: int) -> str:
    info = machine_info()
    lines = [
        f"`python -m loadtest.ort_versions --repository {repository} --preset {preset} --seconds {seconds:g} "
        f"--threads {threads} --rounds {rounds}` on {info['date_utc']} ({info['cpu_model']}, {info['nproc']} CPUs; "
        "best of the alternating rounds; steady-state steps after "
        f"{WARMUP_STEPS} warm-up steps).",
        "",
        "| onnxruntime | sortformer step median / p90 ms | ratio | preprocessor median / p90 ms | ratio | "
        "max \\|Δ preds\\| vs first | steps | all confirmed | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['onnxruntime']} | {r['sortformer_median_ms']:.1f} / {r['sortformer_p90_ms']:.1f} | "
            f"{r['ratio_sortformer']:.2f} | {r['preprocessor_median_ms']:.2f} / {r['preprocessor_p90_ms']:.2f} | "
            f"{r['ratio_preprocessor']:.2f} | {r['max_abs_diff_vs_first']:.1e} | {r['steps']} | {r['finished']} | "
            f"{r['load']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.ort_versions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path,
                    help="an exported repository flavour holding the graphs, e.g. build/full/production")
    ap.add_argument("--preset", default="low")
    ap.add_argument("--ort", action="append", help="onnxruntime version (repeatable; default 1.19.2 and 1.32.0); "
                                                   "the first is the baseline of the ratios")
    ap.add_argument("--seconds", type=float, default=60.0, help="conversation length (default 60)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per session (default 2)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per version (default 2)")
    ap.add_argument("--markdown", type=Path, help="write the table into this document's ort-versions section")
    ap.add_argument("--install", metavar="VERSION", help="only create the venv for this onnxruntime version "
                                                         "(scripts/setup.sh does it for NGC 24.10's 1.19.2)")
    ap.add_argument("--streams", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.install:
        print(interpreter_for(args.install))
        return 0
    if args.repository is None:
        ap.error("--repository is required")
    if args.worker:
        worker(args.repository, args.preset, args.seconds, args.streams, args.threads, args.out)
        return 0
    get_preset(args.preset)
    versions = args.ort or ["1.19.2", "1.32.0"]
    rows = run(args.repository, args.preset, versions, args.seconds, args.threads, args.rounds)
    table = markdown(rows, args.repository, args.preset, args.seconds, args.threads, args.rounds)
    print(table)
    if args.markdown:
        replace_marked_section(args.markdown, MARKER, "## onnxruntime versions\n\n" + table, "Production")
    return 0 if all(r["finished"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
