"""``python -m export.parity``: the exported graphs against NeMo's own streaming loop.

For every preset it exports the two graphs, streams synthetic conversations through them with
onnxruntime (as Triton would: one request per step, flush steps, END) and compares, frame by frame:
predictions with NeMo's ``forward_streaming_step`` loop (async_streaming=True, NeMo features), and
features with NeMo's preprocessor on the whole file. The feature graph computes NeMo's pipeline in float64
and must equal it evaluated exactly within 1e-5; its difference to NeMo's float32 output may then be no
larger than NeMo's own rounding (reported as nemo_features_vs_float64, ~2.5e-4 in near-silent bands). Batch 4 runs four
streams of different lengths that start at different steps, each compared with NeMo run on it alone.
Prints one JSON line per preset and batch; exits 1 if any line fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from sortformer_triton import contract
from sortformer_triton.presets import PRESETS, Preset
from sortformer_triton.samples import conversation

PRED_TOL = 1e-4
# Features: the exported graph computes NeMo's pipeline in float64, so it is held to 1e-5 of NeMo's pipeline
# evaluated exactly; NeMo's own float32 torch.stft is up to ~2.5e-4 off that in near-silent bands, so the
# difference to NeMo may be no larger than NeMo's own rounding plus 1e-5.
FEAT_TOL_EXACT = 1e-5


def min_seconds(p: Preset) -> float:
    """Long enough for FIFO overflow and at least 3 speaker-cache compressions, plus a partial tail."""
    frames_per_pop = max(p.spkcache_update_period, p.chunk_len)
    frames = p.fifo_len + p.chunk_len + 4 * frames_per_pop + p.spkcache_len
    return round(frames * 0.08 + 1.37, 2)


@dataclasses.dataclass
class StreamCheck:
    pred_diff: float
    feat_diff: float  # ours vs NeMo
    feat_diff_exact: float  # ours vs the float64 pipeline
    nemo_rounding: float  # NeMo vs the float64 pipeline
    frames: int
    compressions: int
    requests: int
    finished: bool
    # NeMo made a silence decision within reference.BOUNDARY_MARGIN of its threshold at this step: from the
    # next step on any two float implementations may differ; frames up to it must still agree
    near_boundary_step: Optional[int] = None
    near_boundary_margin: Optional[float] = None
    pred_diff_before_boundary: Optional[float] = None

    @property
    def preds_ok(self) -> bool:
        if self.pred_diff <= PRED_TOL:
            return True
        return self.pred_diff_before_boundary is not None and self.pred_diff_before_boundary <= PRED_TOL


def check_streams(model, preset: Preset, audios: Sequence[np.ndarray], start_at: Sequence[int],
                  pre_fn, step_fn) -> List[StreamCheck]:
    from .reference import StatefulGraph, exact_features, max_abs_diff, nemo_features, nemo_stream, stream_through

    emb_dim = int(model.cfg.encoder.d_model)
    pre = StatefulGraph(pre_fn, contract.preprocessor_io(preset))
    step = StatefulGraph(step_fn, contract.sortformer_io(preset, emb_dim))
    results = stream_through(pre, step, preset, audios, start_at)
    checks = []
    for audio, res in zip(audios, results):
        ref = nemo_stream(model, preset, audio)
        nemo_feats, exact = nemo_features(model, audio), exact_features(model, audio)
        before = None
        if ref.near_boundary_step is not None:
            settled = (ref.near_boundary_step + 1) * preset.chunk_len
            before = max_abs_diff(ref.preds[:settled], res.preds[:settled])
        checks.append(StreamCheck(
            pred_diff=max_abs_diff(ref.preds, res.preds),
            feat_diff=max_abs_diff(nemo_feats, res.features),
            feat_diff_exact=max_abs_diff(exact, res.features),
            nemo_rounding=max_abs_diff(exact, nemo_feats),
            frames=int(res.preds.shape[0]), compressions=ref.compressions, requests=res.requests,
            finished=res.finished and res.preds.shape == ref.preds.shape,
            near_boundary_step=ref.near_boundary_step, near_boundary_margin=ref.near_boundary_margin,
            pred_diff_before_boundary=before,
        ))
    return checks


def batch_streams(seconds: float, batch: int, seed: int) -> tuple[List[np.ndarray], List[int]]:
    """`batch` conversations of different lengths (never a whole number of steps) and start steps."""
    audios, starts = [], []
    for i in range(batch):
        length = seconds * (1.0 - 0.13 * i) + 0.37 * i
        audio, _ = conversation(length, n_speakers=2 + i % 3, seed=seed + i)
        audios.append(audio)
        starts.append([0, 2, 1, 3][i % 4])
    return audios, starts


def run_preset(model, preset: Preset, batches: Sequence[int], seconds: Optional[float], seed: int,
               workdir: Path, source: str, engine: str = "onnx") -> List[Dict[str, object]]:
    from .onnx_export import export_preprocessor, export_step
    from .reference import ort_fn, torch_fn, configure_streaming
    from .graphs import StreamingFeatures, StreamingStep

    if engine == "onnx":
        pre_path = export_preprocessor(model, preset, workdir / f"pre_{preset.name}.onnx", source)
        step_path = export_step(model, preset, workdir / f"step_{preset.name}.onnx", source)
        pre_fn, step_fn = ort_fn(str(pre_path)), ort_fn(str(step_path))
    else:
        configure_streaming(model, preset)
        emb_dim = int(model.cfg.encoder.d_model)
        pre_fn = torch_fn(StreamingFeatures(model.preprocessor.featurizer, preset).eval(), contract.preprocessor_io(preset))
        step_fn = torch_fn(StreamingStep(model, preset).eval(), contract.sortformer_io(preset, emb_dim))
    secs = seconds or min_seconds(preset)
    lines = []
    for batch in batches:
        t0 = time.perf_counter()
        audios, starts = batch_streams(secs, batch, seed)
        if batch == 1:
            starts = [0]
        checks = check_streams(model, preset, audios, starts, pre_fn, step_fn)
        pred = max(c.pred_diff for c in checks)
        feat = max(c.feat_diff for c in checks)
        feat_exact = max(c.feat_diff_exact for c in checks)
        feat_ok = all(c.feat_diff_exact <= FEAT_TOL_EXACT and c.feat_diff <= c.nemo_rounding + FEAT_TOL_EXACT
                      for c in checks)
        line = {
            "preset": preset.name, "batch": batch, "engine": engine, "model": source,
            "async_streaming": True,
            "max_abs_diff": pred, "features_max_abs_diff": feat, "features_max_abs_diff_vs_float64": feat_exact,
            "nemo_features_vs_float64": max(c.nemo_rounding for c in checks),
            "frames": [c.frames for c in checks], "compressions": [c.compressions for c in checks],
            "requests": [c.requests for c in checks], "all_confirmed": all(c.finished for c in checks),
            "near_boundary": [None if c.near_boundary_step is None else
                              {"step": c.near_boundary_step, "margin": c.near_boundary_margin,
                               "max_abs_diff_before": c.pred_diff_before_boundary, "max_abs_diff": c.pred_diff}
                              for c in checks],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        line["pass"] = bool(all(c.preds_ok for c in checks) and feat_ok
                            and line["all_confirmed"] and min(line["compressions"]) >= (3 if batch == 1 else 1))
        lines.append(line)
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (default), full, a .nemo file or a Hugging Face id")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable; default all")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 4)")
    ap.add_argument("--seconds", type=float, help="audio length (default: enough for 3 compressions per preset)")
    ap.add_argument("--engine", choices=["onnx", "torch"], default="onnx",
                    help="run the exported ONNX files in onnxruntime (default) or the graph modules in torch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from .models import load_model

    torch.set_num_threads(2)
    model = load_model(args.model, seed=args.seed)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.preset or PRESETS:
            for line in run_preset(model, PRESETS[name], args.batch or [1, 4], args.seconds, args.seed,
                                   Path(tmp), args.model, args.engine):
                ok &= line["pass"]
                print(json.dumps(line), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
