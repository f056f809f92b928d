"""``python -m export.parity``: the exported graphs against NeMo's own streaming loop.

For every case and preset it exports the two graphs, streams conversations through them with onnxruntime
(as Triton would: one request per step, flush steps, END) and compares, frame by frame: predictions with
NeMo's ``forward_streaming_step`` loop (async_streaming=True, NeMo features) **with its top-k ties broken by
lower index first** (``reference.nemo_stream(topk="deterministic")``, the rule the graphs implement), and
features with NeMo's preprocessor on the whole file.

Cases (random-init sources get a model per case; a real model keeps its weights): ``calibrated`` (head
fitted to a synthetic conversation, no ties), ``saturated`` (a confident head: most probabilities exactly
1.0 or ~0, many compression scores exactly equal), ``espeak`` (the same on espeak-ng speech), and
``on_speech_boundary`` / ``on_silence_boundary`` (a slot pinned to p = 0.5 / 0.2 exactly, on the custom
preset ``landings`` whose FIFO and speaker cache fill exactly: every discrete decision lands on its boundary).
Each line also reports NeMo's own sensitivity: NeMo as shipped (torch.topk) against the deterministic rule,
as max |Δ| and as DER/JER of their segments (collar 0.25 s), ties per compression, and how close every
decision came to its boundary. The feature graph computes NeMo's pipeline in float64
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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sortformer_triton import contract
from sortformer_triton.presets import PRESETS, Preset
from sortformer_triton.samples import conversation, espeak_conversation

from .models import ESPEAK_SATURATED_MARGIN

PRED_TOL = 1e-4
# Features: the exported graph computes NeMo's pipeline in float64, so it is held to 1e-5 of NeMo's pipeline
# evaluated exactly; NeMo's own float32 torch.stft is up to ~2.5e-4 off that in near-silent bands, so the
# difference to NeMo may be no larger than NeMo's own rounding plus 1e-5.
FEAT_TOL_EXACT = 1e-5
COLLAR = 0.25
# FIFO of 5 chunks and a speaker cache of 4 pops: chunks fill the FIFO exactly, pops fill the cache exactly
LANDINGS = Preset("landings", chunk_len=8, right_context=2, left_context=1, fifo_len=40,
                  spkcache_update_period=24, spkcache_len=96)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    voices: str  # synthetic | espeak: the conversations streamed (and, for random init, the head's fit)
    saturated: bool  # random init: a confident head (models.saturated_model) instead of a calibrated one
    margin: Optional[float] = None  # the saturated head's margin (models.SATURATED_MARGIN by default)
    pinned: Optional[Tuple[int, float]] = None  # (slot, probability): models.pin_slot
    preset: Optional[Preset] = None  # runs on this preset only
    lands_on: Tuple[str, ...] = ()  # decisions that must land exactly on their boundary
    min_tied_compressions: int = 0  # batch 1: compressions whose top-k the tie rule decided


CASES: Dict[str, Case] = {c.name: c for c in (
    Case("calibrated", "synthetic", saturated=False),
    Case("saturated", "synthetic", saturated=True, min_tied_compressions=3),
    Case("espeak", "espeak", saturated=True, margin=ESPEAK_SATURATED_MARGIN, min_tied_compressions=3),
    Case("on_speech_boundary", "synthetic", saturated=True, pinned=(3, 0.5), preset=LANDINGS,
         lands_on=("speech", "positive", "fifo", "cache")),
    Case("on_silence_boundary", "synthetic", saturated=True, pinned=(3, 0.2), preset=LANDINGS,
         lands_on=("silence", "fifo", "cache")),
)}


def min_seconds(p: Preset) -> float:
    """Long enough for FIFO overflow and at least 3 speaker-cache compressions, plus a partial tail."""
    frames_per_pop = max(p.spkcache_update_period, p.chunk_len)
    frames = p.fifo_len + p.chunk_len + 4 * frames_per_pop + p.spkcache_len
    return round(frames * 0.08 + 1.37, 2)


def case_model(source: str, case: Case, seed: int, loaded=None):
    """The model a case runs: random init per case (calibrated / saturated, fitted to its voices), or the
    loaded real model (loaded afresh when a slot is to be pinned); then the pinned slot, if any."""
    from .models import RANDOM_SOURCES, load_model, pin_slot, random_model

    if source in RANDOM_SOURCES:
        model = random_model(source, seed=seed, saturated=case.saturated, voices=case.voices, margin=case.margin)
    else:
        model = loaded if loaded is not None and not case.pinned else load_model(source, seed=seed)
    if case.pinned:
        pin_slot(model, *case.pinned)
    return model


def der_jer(reference: np.ndarray, hypothesis: np.ndarray, collar: float = COLLAR) -> Tuple[Optional[float], Optional[float]]:
    """DER and JER (pyannote.metrics, ``collar`` s each side) of the segments of two probability arrays,
    the first as reference; None when the reference has no speech left to score (e.g. every segment shorter
    than the collars)."""
    from clients.diarize.evaluate import evaluate
    from clients.sortformer_client.rttm import Turn
    from sortformer_triton.timeline import segments_from_probs

    def turns(probs):
        return [Turn("x", s.start, s.end - s.start, f"spk{s.speaker}") for s in segments_from_probs(probs)]

    ref, hyp = turns(reference), turns(hypothesis)
    if not ref:
        return None, None
    try:
        total = evaluate({"x": ref}, {"x": hyp}, collar=collar).total
    except ZeroDivisionError:  # pyannote's JER when no reference speech survives the collars
        return None, None
    return total.der, total.jer


@dataclasses.dataclass
class StreamCheck:
    pred_diff: float  # ours vs NeMo (deterministic top-k, NeMo's features)
    pred_diff_exact_features: float  # ours vs NeMo (deterministic top-k) on the float64-exact features
    # how far NeMo (deterministic) itself moves when its features change by float32 rounding alone: on the
    # float64-exact features, and on its own features nudged by one ulp at random (the larger of the two)
    nemo_feature_sensitivity: float
    feat_diff: float  # ours vs NeMo
    feat_diff_exact: float  # ours vs the float64 pipeline
    nemo_rounding: float  # NeMo vs the float64 pipeline
    frames: int
    compressions: int
    requests: int
    finished: bool
    ties: List[int]  # per compression: scores tied at a top-k cut that the tie rule decided
    decisions: Dict[str, object]
    # NeMo as shipped (torch.topk's own tie order) vs the deterministic rule, and ours vs NeMo as shipped
    nemo_tie_sensitivity: float
    pred_diff_default: float
    der_jer_nemo_default_vs_deterministic: Tuple[Optional[float], Optional[float]]
    der_jer_ours_vs_nemo_default: Tuple[Optional[float], Optional[float]]
    # the same without collars: every 80 ms frame scored (what a tiny model's short segments leave)
    der_jer_nemo_default_vs_deterministic_no_collar: Tuple[Optional[float], Optional[float]]
    # NeMo made a decision within reference.BOUNDARY_MARGIN of its boundary (not exactly on it) at this step:
    # from the next step on any two float implementations may differ; frames up to it must still agree
    near_boundary_step: Optional[int] = None
    near_boundary_kind: Optional[str] = None
    pred_diff_before_boundary: Optional[float] = None

    @property
    def account(self) -> Optional[str]:
        """Why the predictions pass: equal within PRED_TOL; or no further from NeMo (or from NeMo on the exact
        features) than NeMo itself moves when its features change only by their float32 rounding, plus
        PRED_TOL; or a near-boundary decision with every frame before it passing so."""
        if self.pred_diff <= PRED_TOL:
            return "equal"
        # against NeMo itself, or against NeMo on the exact features (the better-defined of the two): as close
        # as NeMo's own float32 run is to it, plus PRED_TOL
        if min(self.pred_diff, self.pred_diff_exact_features) <= self.nemo_feature_sensitivity + PRED_TOL:
            return "nemo_float_sensitivity"
        if self.pred_diff_before_boundary is not None and self.pred_diff_before_boundary <= PRED_TOL:
            return "near_boundary"
        return None

    @property
    def preds_ok(self) -> bool:
        return self.account is not None


def check_streams(model, preset: Preset, audios: Sequence[np.ndarray], start_at: Sequence[int],
                  pre_fn, step_fn, engine: str = "onnx") -> List[StreamCheck]:
    from .reference import StatefulGraph, exact_features, max_abs_diff, nemo_features, nemo_stream, stream_through

    emb_dim = int(model.cfg.encoder.d_model)
    pre = StatefulGraph(pre_fn, contract.preprocessor_io(preset))
    step = StatefulGraph(step_fn, contract.sortformer_io(preset, emb_dim))
    results = stream_through(pre, step, preset, audios, start_at)
    checks = []
    for audio, res in zip(audios, results):
        nemo_feats, exact = nemo_features(model, audio), exact_features(model, audio)
        ref = nemo_stream(model, preset, audio, topk="deterministic")
        ref_exact = nemo_stream(model, preset, audio, topk="deterministic", features=exact.astype(np.float32))
        ref_default = nemo_stream(model, preset, audio, topk="default")
        nudge = np.where(np.random.default_rng(len(audio)).random(nemo_feats.shape) < 0.5, -np.inf, np.inf)
        ref_ulp = nemo_stream(model, preset, audio, topk="deterministic",
                              features=np.nextafter(nemo_feats, nudge.astype(np.float32)))
        sensitivity = max(max_abs_diff(ref.preds, ref_exact.preds), max_abs_diff(ref.preds, ref_ulp.preds))
        # the exported graphs round the score logs correctly; run in torch they use NeMo's own log
        near_step, near_kind = ref.decisions.first_near(log_rounding=engine == "onnx")
        before = None
        if near_step is not None:
            settled = (near_step + 1) * preset.chunk_len
            before = max_abs_diff(ref.preds[:settled], res.preds[:settled])
            moved = max(max_abs_diff(ref.preds[:settled], ref_exact.preds[:settled]),
                        max_abs_diff(ref.preds[:settled], ref_ulp.preds[:settled]))
            before = max(before - moved, 0.0)  # what NeMo's own float32 movement does not explain
        checks.append(StreamCheck(
            pred_diff=max_abs_diff(ref.preds, res.preds),
            pred_diff_exact_features=max_abs_diff(ref_exact.preds, res.preds),
            nemo_feature_sensitivity=sensitivity,
            feat_diff=max_abs_diff(nemo_feats, res.features),
            feat_diff_exact=max_abs_diff(exact, res.features),
            nemo_rounding=max_abs_diff(exact, nemo_feats),
            frames=int(res.preds.shape[0]), compressions=ref.compressions, requests=res.requests,
            finished=res.finished and res.preds.shape == ref.preds.shape,
            ties=ref.ties, decisions=ref.decisions.as_dict(),
            nemo_tie_sensitivity=max_abs_diff(ref.preds, ref_default.preds),
            pred_diff_default=max_abs_diff(ref_default.preds, res.preds),
            der_jer_nemo_default_vs_deterministic=der_jer(ref.preds, ref_default.preds),
            der_jer_ours_vs_nemo_default=der_jer(ref_default.preds, res.preds),
            der_jer_nemo_default_vs_deterministic_no_collar=der_jer(ref.preds, ref_default.preds, collar=0.0),
            near_boundary_step=near_step, near_boundary_kind=near_kind,
            pred_diff_before_boundary=before,
        ))
    return checks


def batch_streams(seconds: float, batch: int, seed: int, voices: str = "synthetic") -> tuple[List[np.ndarray], List[int]]:
    """`batch` conversations of different lengths (never a whole number of steps) and start steps."""
    make = conversation if voices == "synthetic" else espeak_conversation
    audios, starts = [], []
    for i in range(batch):
        length = seconds * (1.0 - 0.13 * i) + 0.37 * i
        audio, _ = make(length, n_speakers=2 + i % 3, seed=seed + i)
        audios.append(audio)
        starts.append([0, 2, 1, 3][i % 4])
    return audios, starts


def landed(case: Case, checks: Sequence[StreamCheck]) -> Dict[str, bool]:
    """For each decision the case must land on: did some stream land exactly on its boundary."""
    out = {}
    for kind in case.lands_on:
        if kind == "fifo":
            out[kind] = any(c.decisions["fifo_exact_steps"] for c in checks)
        elif kind == "cache":
            out[kind] = any(c.decisions["cache_exact_steps"] for c in checks)
        else:
            out[kind] = any(c.decisions["exact_landings"][kind] for c in checks)
    return out


def _round(x: Optional[float], digits: int = 4) -> Optional[float]:
    return None if x is None else round(float(x), digits)


def run_preset(model, preset: Preset, batches: Sequence[int], seconds: Optional[float], seed: int,
               workdir: Path, source: str, engine: str = "onnx", case: Case = CASES["calibrated"]) -> List[Dict[str, object]]:
    from .onnx_export import export_preprocessor, export_step
    from .reference import ort_fn, torch_fn, configure_streaming
    from .graphs import StreamingFeatures, StreamingStep

    if engine == "onnx":
        tag = f"{case.name}_{preset.name}"
        pre_path = export_preprocessor(model, preset, workdir / f"pre_{tag}.onnx", source)
        step_path = export_step(model, preset, workdir / f"step_{tag}.onnx", source)
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
        audios, starts = batch_streams(secs, batch, seed, case.voices)
        if batch == 1:
            starts = [0]
        checks = check_streams(model, preset, audios, starts, pre_fn, step_fn, engine)
        feat_ok = all(c.feat_diff_exact <= FEAT_TOL_EXACT and c.feat_diff <= c.nemo_rounding + FEAT_TOL_EXACT
                      for c in checks)
        line = {
            "case": case.name, "preset": preset.name, "batch": batch, "engine": engine, "model": source,
            "async_streaming": True, "reference_topk": "deterministic (equal scores: lower index first)",
            "max_abs_diff": max(c.pred_diff for c in checks),
            "max_abs_diff_exact_features": max(c.pred_diff_exact_features for c in checks),
            "nemo_feature_sensitivity": max(c.nemo_feature_sensitivity for c in checks),
            "accounts": [c.account for c in checks],
            "features_max_abs_diff": max(c.feat_diff for c in checks),
            "features_max_abs_diff_vs_float64": max(c.feat_diff_exact for c in checks),
            "nemo_features_vs_float64": max(c.nemo_rounding for c in checks),
            "frames": [c.frames for c in checks], "compressions": [c.compressions for c in checks],
            "ties_per_compression": [c.ties for c in checks],
            "tied_compressions": [sum(1 for t in c.ties if t) for c in checks],
            "requests": [c.requests for c in checks], "all_confirmed": all(c.finished for c in checks),
            "tie_sensitivity": {
                "nemo_default_vs_deterministic": max(c.nemo_tie_sensitivity for c in checks),
                "ours_vs_nemo_default": max(c.pred_diff_default for c in checks),
                "der_jer_nemo_default_vs_deterministic": [[_round(v) for v in c.der_jer_nemo_default_vs_deterministic]
                                                          for c in checks],
                "der_jer_ours_vs_nemo_default": [[_round(v) for v in c.der_jer_ours_vs_nemo_default] for c in checks],
                "der_jer_nemo_default_vs_deterministic_no_collar": [
                    [_round(v) for v in c.der_jer_nemo_default_vs_deterministic_no_collar] for c in checks],
            },
            "decisions": [c.decisions for c in checks],
            "near_boundary": [None if c.near_boundary_step is None else
                              {"step": c.near_boundary_step, "kind": c.near_boundary_kind,
                               "max_abs_diff_before": c.pred_diff_before_boundary, "max_abs_diff": c.pred_diff}
                              for c in checks],
            "landed": landed(case, checks),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        line["pass"] = bool(
            all(c.preds_ok for c in checks) and feat_ok and line["all_confirmed"]
            and min(line["compressions"]) >= (3 if batch == 1 else 1)
            and (batch != 1 or line["tied_compressions"][0] >= case.min_tied_compressions)
            and all(line["landed"].values())
        )
        lines.append(line)
    return lines


def run_case(source: str, case: Case, presets: Sequence[Preset], batches: Sequence[int], seconds: Optional[float],
             seed: int, workdir: Path, engine: str = "onnx", loaded=None) -> List[Dict[str, object]]:
    """Every preset of a case (a landing case: its own preset) with the case's model."""
    model = case_model(source, case, seed, loaded)
    lines = []
    for preset in [case.preset] if case.preset else presets:
        lines += run_preset(model, preset, batches, seconds, seed, workdir, source, engine, case)
    return lines


def _e(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.1e}"


def _pct(pairs: Sequence[Sequence[Optional[float]]], which: int) -> str:
    vals = [p[which] for p in pairs if p[which] is not None]
    return "–" if not vals else f"{100 * max(vals):.2f}"


def markdown(lines: Sequence[Dict[str, object]], source: str) -> str:
    """One table per case: parity with the deterministic reference, its account, ties, and NeMo's own tie
    sensitivity (docs/parity.md)."""
    out = [f"`python -m export.parity --model {source}`, {time.strftime('%Y-%m-%d')}. Max over the batch's streams; "
           "DER/JER in % (max over streams), collar 0.25 s each side (– : no speech "
           "left to score), and without collar, the first output as reference.", ""]
    for case in dict.fromkeys(line["case"] for line in lines):
        out += [f"**{case}**", "",
                "| preset | batch | max \|Δ\| vs NeMo (det.) | on exact features | NeMo's own float32 sensitivity "
                "| accounts | compressions (tied) | ties per compression | NeMo default vs det. max \|Δ\| "
                "| DER / JER default vs det. | the same, no collar | ours vs NeMo default: DER / JER | landed | pass |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for line in (x for x in lines if x["case"] == case):
            ties = [t for stream in line["ties_per_compression"] for t in stream]
            sens = line["tie_sensitivity"]
            accounts = ", ".join(sorted({str(a) for a in line["accounts"]}))
            comp = ", ".join(f"{c} ({t})" for c, t in zip(line["compressions"], line["tied_compressions"]))
            out.append(
                f"| {line['preset']} | {line['batch']} | {_e(line['max_abs_diff'])} | {_e(line['max_abs_diff_exact_features'])} "
                f"| {_e(line['nemo_feature_sensitivity'])} | {accounts} | {comp} "
                f"| {f'{min(ties)}–{max(ties)}' if ties else '–'} | {sens['nemo_default_vs_deterministic']:.3f} "
                f"| {_pct(sens['der_jer_nemo_default_vs_deterministic'], 0)} / {_pct(sens['der_jer_nemo_default_vs_deterministic'], 1)} "
                f"| {_pct(sens['der_jer_nemo_default_vs_deterministic_no_collar'], 0)} / "
                f"{_pct(sens['der_jer_nemo_default_vs_deterministic_no_collar'], 1)} "
                f"| {_pct(sens['der_jer_ours_vs_nemo_default'], 0)} / {_pct(sens['der_jer_ours_vs_nemo_default'], 1)} "
                f"| {', '.join(k for k, v in line['landed'].items() if v) or '–'} | {line['pass']} |")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (default), full, a .nemo file or a Hugging Face id")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable; default all")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable; default all")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 4)")
    ap.add_argument("--seconds", type=float, help="audio length (default: enough for 3 compressions per preset)")
    ap.add_argument("--engine", choices=["onnx", "torch"], default="onnx",
                    help="run the exported ONNX files in onnxruntime (default) or the graph modules in torch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offline", action="store_true",
                    help="the offline Sortformer v1 family instead (--model for it: tiny, full, .nemo, HF id): the "
                         "exported offline graph on padded batches vs NeMo's forward on each recording alone")
    ap.add_argument("--markdown", type=Path, help="also write the tables into this file's "
                    "<!-- BEGIN parity:<model> --> section (docs/parity.md)")
    args = ap.parse_args(argv)

    import torch

    from .models import RANDOM_SOURCES, load_model

    torch.set_num_threads(2)
    if args.offline:
        from .offline import parity_lines

        ok = True
        loaded = None if args.model in RANDOM_SOURCES else load_model(args.model, seed=args.seed, offline=True)
        with tempfile.TemporaryDirectory() as tmp:
            for line in parity_lines(args.model, args.seed, args.batch or [1, 4], Path(tmp), loaded):
                ok &= line["pass"]
                print(json.dumps(line), flush=True)
        return 0 if ok else 1
    loaded = None if args.model in RANDOM_SOURCES else load_model(args.model, seed=args.seed)
    presets = [PRESETS[name] for name in (args.preset or PRESETS)]
    ok, lines = True, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.case or CASES:
            for line in run_case(args.model, CASES[name], presets, args.batch or [1, 4], args.seconds, args.seed,
                                 Path(tmp), args.engine, loaded):
                ok &= line["pass"]
                lines.append(line)
                print(json.dumps(line), flush=True)
    if args.markdown:
        from loadtest.common import replace_marked_section

        replace_marked_section(args.markdown, f"parity:{args.model}:{args.engine}", markdown(lines, args.model),
                               "Parity of the exported graphs with NeMo")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
