"""``python -m clients.curator``: a NeMo Curator pipeline on Ray whose diarization runs on a Triton server.

Commands (run in the Curator venv, ``clients.curator.env``)::

    python -m clients.curator separate FILES_OR_DIRS... --url HOST:PORT --out DIR [--preset P] [...]
    python -m clients.curator diarize  FILES_OR_DIRS... --url HOST:PORT --out DIR [--preset P] [...]

Both read the files through Curator's ``ManifestReader`` (or ``--manifest M.jsonl`` with ``audio_filepath``
entries). ``separate``: ``TritonSpeakerSeparationStage`` then a writer stage, ``<out>/<uri>_<speaker>.wav``
(float32, the task's waveform exactly) and ``<out>/speakers.jsonl`` (one line per speaker task: its fields
but the waveform, plus ``speaker_audio_filepath``). ``diarize``: ``TritonSortformerDiarizationStage``,
``<out>/rttm/<uri>.rttm`` and ``<out>/diarization.jsonl``.

Ray: a local cluster (``--ray-cpus``, ``--object-store-mb``, no dashboard) or ``--ray-address`` of a running
one. Exit status: 0 done, 1 the pipeline failed, 2 bad arguments or the server/model is unavailable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from clients.diarize.split import DEFAULT_BUFFER_TIME, DEFAULT_GAP_THRESHOLD, DEFAULT_MIN_DURATION
    from clients.sortformer_client import PROTOCOLS
    from clients.sortformer_client.client import DEFAULT_TIMEOUT_S

    from .core import DEFAULT_MAX_CONCURRENCY, DEFAULT_PRESET

    parser = argparse.ArgumentParser(prog="python -m clients.curator",
                                     description="NeMo Curator diarization / speaker separation on a Triton server")
    parser.add_argument("command", choices=("separate", "diarize"))
    parser.add_argument("inputs", nargs="*", type=Path,
                        help="audio files, or directories searched recursively (as diarize run searches them)")
    parser.add_argument("--manifest", type=Path, help="a JSONL manifest (audio_filepath per line) instead of files")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--url", default=os.environ.get("DIARIZE_URL", "localhost:8001"),
                        help="Triton server or proxy, host:port (default $DIARIZE_URL or %(default)s)")
    parser.add_argument("--protocol", default="grpc", choices=PROTOCOLS)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="streaming preset or 'offline' (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_MAX_CONCURRENCY,
                        help="tasks per process_batch call (default %(default)s)")
    parser.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                        help="sequences in flight per worker (default %(default)s)")
    parser.add_argument("--on-error", default="raise", choices=("raise", "fail"),
                        help="a failed task stops the pipeline (raise) or becomes a FailedTask (fail)")
    parser.add_argument("--keep-overlaps", action="store_true", help="separate: exclude_overlaps=False")
    parser.add_argument("--min-duration", type=float, default=DEFAULT_MIN_DURATION)
    parser.add_argument("--gap-threshold", type=float, default=DEFAULT_GAP_THRESHOLD)
    parser.add_argument("--buffer-time", type=float, default=DEFAULT_BUFFER_TIME)
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--object-store-mb", type=int, default=512, help="local Ray object store (MiB)")
    return parser


def _write_manifest(files: List[Path], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for f in files:
            fh.write(json.dumps({"audio_filepath": os.fspath(f.resolve())}) + "\n")
    return path


def _start_ray(args: argparse.Namespace) -> None:
    import ray

    if args.ray_address:
        ray.init(address=args.ray_address, ignore_reinit_error=True)
    else:
        ray.init(num_cpus=args.ray_cpus, object_store_memory=args.object_store_mb * 2 ** 20,
                 include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)


def main(argv: List[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from clients.diarize.cli import collect_files
    from clients.sortformer_client import DiarizationError

    from . import core

    try:
        core.check_options(args.url, args.protocol, args.preset, args.timeout, args.max_concurrency)
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if (args.manifest is None) == (not args.inputs):
            raise ValueError("give audio files/directories or --manifest (one of them)")
        files = collect_files([os.fspath(p) for p in args.inputs]) if args.inputs else []
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:  # fail fast on the driver, before Ray starts (every worker checks again in setup())
        core.connect(args.url, args.protocol, args.preset, args.timeout).close()
    except DiarizationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from nemo_curator.backends.ray_actor_pool import RayActorPoolExecutor
    from nemo_curator.pipeline import Pipeline
    from nemo_curator.stages.audio.common import ManifestReader

    from .stages import SpeakerAudioWriterStage, TritonSortformerDiarizationStage, TritonSpeakerSeparationStage

    args.out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="curator_manifest_")
    manifest = args.manifest or _write_manifest(files, Path(tmp.name) / "input.jsonl")
    server = dict(url=args.url, protocol=args.protocol, preset=args.preset, timeout=args.timeout,
                  max_concurrency=args.max_concurrency, on_error=args.on_error, batch_size=args.batch_size)
    pipeline = Pipeline(name=f"triton_sortformer_{args.command}")
    pipeline.add_stage(ManifestReader(manifest_path=os.fspath(manifest)))
    if args.command == "separate":
        pipeline.add_stage(TritonSpeakerSeparationStage(
            exclude_overlaps=not args.keep_overlaps, min_duration=args.min_duration,
            gap_threshold=args.gap_threshold, buffer_time=args.buffer_time, **server))
        pipeline.add_stage(SpeakerAudioWriterStage(out_dir=os.fspath(args.out)))
    else:
        pipeline.add_stage(TritonSortformerDiarizationStage(rttm_out_dir=os.fspath(args.out / "rttm"), **server))
    t0 = time.perf_counter()
    _start_ray(args)
    try:
        tasks = pipeline.run(RayActorPoolExecutor(show_progress=False)) or []
    except Exception as exc:  # noqa: BLE001 - the stage's message names the task and the cause
        print(f"error: the pipeline failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        tmp.cleanup()
    failed = sum(1 for task in tasks if task.data is None)  # FailedTask sentinels (--on-error fail)
    rows = [{k: v for k, v in task.data.items() if k != "waveform"} for task in tasks if task.data is not None]
    name = "speakers.jsonl" if args.command == "separate" else "diarization.jsonl"
    rows.sort(key=lambda r: (str(r.get("audio_filepath")), str(r.get("speaker_id", ""))))
    with open(args.out / name, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=_jsonable) + "\n")
    print(f"{len(rows)} {'speaker tasks' if args.command == 'separate' else 'recordings'} -> {args.out / name} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if failed:
        print(f"error: {failed} task(s) failed (logged above)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _jsonable(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
