"""``python -m export``: a NeMo Streaming Sortformer -> a complete Triton model repository.

For every preset it writes the streaming feature graph and the streaming Sortformer step as ONNX, and
the configs of both repository flavours (``production``: onnxruntime backend + implicit state;
``local``: the embedded Python-backend server), with the Python models' ``model.py`` copied in.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from sortformer_triton import contract, offline, repository, validator
from sortformer_triton.presets import PRESETS, Preset, PresetError

from .models import DEFAULT_HF_ID, OFFLINE_HF_ID, SourceError

ROOT = Path(__file__).resolve().parents[1]
PYTHON_MODELS = {
    "stateful_onnx": ROOT / "python_backend" / "stateful_onnx" / "model.py",
    "postprocessor": ROOT / "python_backend" / "postprocessor" / "model.py",
    "admission": ROOT / "python_backend" / "admission" / "model.py",
}
OFFLINE_PYTHON_MODELS = {  # model name -> model.py of the offline diarizer's Python models
    offline.ADMISSION: ROOT / "python_backend" / "offline_admission" / "model.py",
    offline.POSTPROCESSOR: ROOT / "python_backend" / "offline_postprocessor" / "model.py",
}
OFFLINE_LOCAL_GRAPH = ROOT / "python_backend" / "offline_onnx" / "model.py"  # sortformer_offline, local flavour
INFO_FILE = "export_info.json"

log = logging.getLogger("export")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python -m export                                  # the released v2.1 weights (needs internet)\n"
            "  python -m export --model my_model.nemo            # a local .nemo file\n"
            "  python -m export --model full                     # random init of the real architecture\n"
            "  python -m export --model tiny --out build/tiny --preset low\n"
            "  python -m export --model full --custom-name mine --chunk-len 12 --right-context 3\n"
            "  python -m export --model tiny --out build/tiny --offline-model tiny   # + the offline v1 diarizer\n"
        ),
    )
    ap.add_argument("--model", default=DEFAULT_HF_ID,
                    help=f"Hugging Face id (default {DEFAULT_HF_ID}), a .nemo file, or 'full'/'tiny' for random "
                         "init of the real architecture / a small variant for tests")
    ap.add_argument("--out", type=Path, default=repository.REPOSITORY_ROOT,
                    help="repository root; <out>/production and <out>/local are written, each replaced as a whole "
                         "(default: model_repository/, which is only for full-size models: its configs are checked "
                         "in). The production flavour must pass sortformer_triton.validator (the onnxruntime "
                         "backend's load-time rules of NGC 24.10) or nothing is written")
    ap.add_argument("--flavour", choices=[*repository.FLAVOURS, "both"], default="both",
                    help="production (onnxruntime backend, implicit state), local (embedded Python-backend server) "
                         "or both (default)")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="export only this preset (repeatable; default: all four)")
    ap.add_argument("--seed", type=int, default=0, help="random init seed for 'full'/'tiny' (default 0)")
    ap.add_argument("--max-batch-size", type=int, default=repository.DEFAULT_MAX_BATCH_SIZE,
                    help="Triton max_batch_size of the stateful models (default %(default)s)")
    ap.add_argument("--max-candidate-sequences", type=int, default=repository.DEFAULT_MAX_CANDIDATE_SEQUENCES,
                    help="sequence slots per stateful model (default %(default)s); size above your peak streams")
    ap.add_argument("--instance-kind", choices=repository.INSTANCE_KINDS, default="KIND_CPU",
                    help="production instance kind for the ONNX models (default KIND_CPU)")
    ap.add_argument("--sequence-idle-seconds", type=int, default=None,
                    help="seconds without a request after which Triton ends a sequence and frees its slot "
                         f"(default: per preset, {repository.IDLE_STEPS} steps and at least "
                         f"{repository.IDLE_MIN_SECONDS} s)")
    off = ap.add_argument_group("offline diarizer", "also serve an offline Sortformer (v1) as diarizer_offline: whole "
                                "recordings, dynamic batching, no streaming state")
    off.add_argument("--offline-model", metavar="SOURCE",
                     help=f"Hugging Face id ({OFFLINE_HF_ID}: needs internet), a .nemo file, or 'full'/'tiny' "
                          "for random init of the v1 architecture")
    off.add_argument("--offline-max-seconds", type=float, default=offline.DEFAULT_MAX_SECONDS,
                     help="longest recording one request may carry (default %(default)s s: v1's training sessions; "
                          "full attention makes memory grow with its square)")
    custom = ap.add_argument_group("custom preset", "add a preset of your own (all sizes in 80 ms frames)")
    custom.add_argument("--custom-name", help="name of the custom preset (lower-case letters, digits, _)")
    custom.add_argument("--chunk-len", type=int)
    custom.add_argument("--right-context", type=int)
    custom.add_argument("--left-context", type=int, default=1)
    custom.add_argument("--fifo-len", type=int, default=188)
    custom.add_argument("--spkcache-update-period", type=int, default=144)
    custom.add_argument("--spkcache-len", type=int, default=188)
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def selected_presets(args: argparse.Namespace) -> List[Preset]:
    presets = [PRESETS[n] for n in (args.preset or PRESETS)]
    if args.custom_name:
        if args.chunk_len is None or args.right_context is None:
            raise PresetError("a custom preset needs --chunk-len and --right-context")
        if args.custom_name in PRESETS:
            raise PresetError(f"--custom-name {args.custom_name!r} is a built-in preset name")
        presets.append(Preset(args.custom_name, chunk_len=args.chunk_len, right_context=args.right_context,
                              left_context=args.left_context, fifo_len=args.fifo_len,
                              spkcache_update_period=args.spkcache_update_period, spkcache_len=args.spkcache_len))
    elif args.chunk_len is not None or args.right_context is not None:
        raise PresetError("--chunk-len/--right-context define a custom preset: give it a --custom-name")
    return presets


def _place(src: Path, dst: Path) -> None:
    """Put the same ONNX file in both flavours (hard link where possible: full-size graphs are ~0.5 GB)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_repository(model, source: str, out: Path, presets: Sequence[Preset], flavours: Sequence[str],
                      offline_model=None, offline_source: Optional[str] = None,
                      offline_max_seconds: float = offline.DEFAULT_MAX_SECONDS, **config_kw) -> dict:
    """Write graphs + configs + Python models for `presets` into `out/<flavour>`; returns the export info.

    Everything is written into a staging directory under `out` first; the production flavour must pass
    ``sortformer_triton.validator`` (the onnxruntime backend's load-time rules) before any flavour
    replaces `out/<flavour>` as a whole. A refused export raises ProductionRepositoryError and leaves
    `out` as it was. ``offline_model`` (an offline Sortformer from ``load_model(..., offline=True)``) adds
    ``diarizer_offline`` for recordings up to ``offline_max_seconds``.
    """
    emb_dim = int(model.cfg.encoder.d_model)
    if out.resolve() == repository.REPOSITORY_ROOT.resolve() and emb_dim != repository.FULL_EMB_DIM:
        raise SourceError(
            f"model_repository/ holds the checked-in configs of the full-size architecture (emb_dim "
            f"{repository.FULL_EMB_DIM}); this model has emb_dim {emb_dim}: write it elsewhere with --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-staging-", dir=out))
    try:
        if offline_model is not None:
            config_kw["offline_max_samples"] = offline.max_samples_for(offline_max_seconds)
        info = _write_flavours(model, source, staging, presets, flavours, emb_dim, **config_kw)
        if offline_model is not None:
            info["offline"] = _write_offline(offline_model, offline_source or "?", staging, flavours,
                                             config_kw["offline_max_samples"])
        for flavour in flavours:
            (staging / flavour / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if "production" in flavours:
            validator.require_valid(staging / "production", shown_as=out / "production")
            log.info("production repository passes the onnxruntime backend's load-time rules (%s)",
                     validator.TRITON_RELEASE)
        for flavour in flavours:
            target = out / flavour
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / flavour, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def _write_flavours(model, source: str, out: Path, presets: Sequence[Preset], flavours: Sequence[str],
                    emb_dim: int, **config_kw) -> dict:
    """The streaming presets' configs, graphs and Python models into every flavour; returns the export info
    (``export_repository`` writes it, with the offline model's, as INFO_FILE)."""
    from .onnx_export import export_preprocessor, export_step

    for flavour in flavours:
        repository.write_configs(out / flavour, flavour, presets, emb_dim, **config_kw)
    first = out / flavours[0]
    for p in presets:
        t0 = time.perf_counter()
        pre = export_preprocessor(model, p, first / contract.preprocessor_name(p) / "1" / repository.ONNX_FILE, source)
        step = export_step(model, p, first / contract.sortformer_name(p) / "1" / repository.ONNX_FILE, source)
        log.info("exported %s in %.1f s", p.name, time.perf_counter() - t0)
        for flavour in flavours[1:]:
            _place(pre, out / flavour / contract.preprocessor_name(p) / "1" / repository.ONNX_FILE)
            _place(step, out / flavour / contract.sortformer_name(p) / "1" / repository.ONNX_FILE)
    for flavour in flavours:
        root = out / flavour
        if flavour == "local":
            for p in presets:
                for name in (contract.preprocessor_name(p), contract.sortformer_name(p)):
                    shutil.copy2(PYTHON_MODELS["stateful_onnx"], root / name / "1" / "model.py")
        shutil.copy2(PYTHON_MODELS["postprocessor"], root / contract.POSTPROCESSOR / "1" / "model.py")
        shutil.copy2(PYTHON_MODELS["admission"], root / contract.ADMISSION / "1" / "model.py")
    info = {
        "source": source,
        "random_init": source in ("full", "tiny"),
        "emb_dim": emb_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "presets": [p.to_dict() for p in presets],
        "flavours": list(flavours),
        "async_streaming": True,
    }
    return info


def _write_offline(model, source: str, out: Path, flavours: Sequence[str], max_samples: int) -> dict:
    """The offline graph into every flavour, and its Python models (configs are written with the rest)."""
    from .offline import export_offline

    t0 = time.perf_counter()
    graph = export_offline(model, out / flavours[0] / offline.SORTFORMER / "1" / repository.ONNX_FILE, source,
                           max_samples)
    log.info("exported the offline diarizer in %.1f s", time.perf_counter() - t0)
    for flavour in flavours:
        root = out / flavour
        if flavour != flavours[0]:
            _place(graph, root / offline.SORTFORMER / "1" / repository.ONNX_FILE)
        if flavour == "local":
            shutil.copy2(OFFLINE_LOCAL_GRAPH, root / offline.SORTFORMER / "1" / "model.py")
        for name, path in OFFLINE_PYTHON_MODELS.items():
            shutil.copy2(path, root / name / "1" / "model.py")
    return {"source": source, "random_init": source in ("full", "tiny"), "max_samples": max_samples,
            "emb_dim": int(model.cfg.encoder.d_model), "parameters": sum(p.numel() for p in model.parameters())}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("export").setLevel(logging.INFO)
    from .models import load_model

    try:
        presets = selected_presets(args)
        t0 = time.perf_counter()
        model = load_model(args.model, seed=args.seed)
        if args.model in ("full", "tiny"):
            print(f"NOTE: {args.model!r} is a RANDOM-INIT model of the real architecture (no trained weights); "
                  "its diarization is meaningless, its serving behaviour and speed are real.", file=sys.stderr)
        offline_model = None
        if args.offline_model:
            offline_model = load_model(args.offline_model, seed=args.seed, offline=True)
            if args.offline_model in ("full", "tiny"):
                print(f"NOTE: --offline-model {args.offline_model!r} is a RANDOM-INIT offline Sortformer (v1 "
                      "architecture, no trained weights).", file=sys.stderr)
        flavours = list(repository.FLAVOURS) if args.flavour == "both" else [args.flavour]
        info = export_repository(
            model, args.model, args.out, presets, flavours,
            offline_model=offline_model, offline_source=args.offline_model,
            offline_max_seconds=args.offline_max_seconds,
            max_batch_size=args.max_batch_size, max_candidate_sequences=args.max_candidate_sequences,
            instance_kind=args.instance_kind, sequence_idle_seconds=args.sequence_idle_seconds,
        )
    except (SourceError, PresetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(args.out / f) for f in flavours)}: {len(presets)} preset(s), "
          f"emb_dim {info['emb_dim']}, {info['parameters'] / 1e6:.1f}M parameters, "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
