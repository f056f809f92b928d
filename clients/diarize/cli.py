"""The ``diarize`` command line (``python -m clients.diarize``).

Commands::

    diarize [run] FILES_OR_DIRS... [--url URL] [--protocol P] [--preset P] [--out DIR] [--concurrency N]
    diarize eval --ref DIR --hyp DIR [--collar 0.25] [--skip-overlap] [--json FILE]
    diarize split FILE --rttm FILE --out DIR [--keep-overlaps] [--min-duration S] [--gap-threshold S]
                  [--buffer-time S]
    diarize live [--input-wav FILE | --device DEV] [--url URL] [--protocol P] [--preset P] [--out DIR]

Exit status: 0 success, 1 some files failed, 2 bad arguments or the server/model is unavailable.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from clients.sortformer_client import (
    PROTOCOLS,
    DiarizationClient,
    DiarizationError,
    Result,
    SpeakerProfile,
    load_audio,
    load_named_clips,
    read_rttm,
    safe_uri,
    write_json,
    write_rttm,
)
from clients.sortformer_client.audio import audio_extensions
from clients.sortformer_client.client import DEFAULT_TIMEOUT_S
from sortformer_triton.presets import PRESETS

PROG = "diarize"
COMMANDS = ("run", "eval", "split", "live")
URL_ENV = "DIARIZE_URL"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

SEGMENT_OPTIONS = (
    ("onset", float, "probability above which a segment starts"),
    ("offset", float, "probability below which a segment ends"),
    ("pad_onset", float, "seconds added before each segment"),
    ("pad_offset", float, "seconds added after each segment"),
    ("min_duration_on", float, "segments shorter than this (s) are dropped"),
    ("min_duration_off", float, "gaps shorter than this (s) are filled"),
    ("median_filter_frames", int, "odd median filter length in 80 ms frames (1 = off)"),
)


# ---- argument parsing -------------------------------------------------------------------------------
def _server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--url", default=os.environ.get(URL_ENV, "localhost"),
                       help=f"Triton server host[:port] (default ${URL_ENV} or localhost; the port defaults "
                            "to 8001 for gRPC, 8000 for HTTP)")
    group.add_argument("--protocol", choices=PROTOCOLS, default="grpc",
                       help="grpc (unary), grpc-stream (bidirectional streaming) or http (default grpc)")
    group.add_argument("--preset", choices=sorted(PRESETS), default="low",
                       help="latency preset = the ensemble diarizer_<preset> (default low)")
    group.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help="seconds to wait for each response (default %(default)s)")
    group.add_argument("--max-in-flight", type=int, default=4,
                       help="grpc-stream only: requests of one stream on the wire at once (default 4)")
    names = parser.add_argument_group("named speakers")
    names.add_argument("--enroll", action="append", default=[], metavar="NAME=CLIP",
                       help="play CLIP (one voice, >= 1 s of speech) first and name the slot that takes it "
                            "NAME; repeatable, in order")
    names.add_argument("--profile", type=Path, default=None, metavar="FILE",
                       help="start every stream from this saved speaker profile (.npz, with its names)")
    names.add_argument("--save-profile", action="store_true",
                       help="save each stream's final speaker state as <out>/<uri>.profile.npz")
    seg = parser.add_argument_group("segments (sent to the postprocessor; default: the server's config)")
    for name, kind, text in SEGMENT_OPTIONS:
        seg.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Diarize audio files with Streaming Sortformer on a Triton server: per file an RTTM, "
                    "a JSON (segments + per-frame speaker probabilities) and a PNG of speaker activity.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "other commands (each has --help):\n"
            f"  {PROG} eval  --ref DIR --hyp DIR [--collar 0.25] [--skip-overlap]   DER/JER table\n"
            f"  {PROG} split FILE --rttm FILE --out DIR                            one wav per speaker\n"
            f"  {PROG} live  [--input-wav FILE | --device DEV]                     microphone / live file\n"
            "\nexamples:\n"
            f"  {PROG} meeting.wav calls/ --url localhost:8001 --preset low --out results/ --concurrency 4\n"
            f"  {PROG} clips/ --offline --out results/                  # the offline v1 model, one request a file\n"
            f"  {PROG} eval --ref refs/ --hyp results/ --collar 0.25\n"
            "\nexit status: 0 ok, 1 some files failed, 2 bad arguments or server/model unavailable"
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR",
                        help="audio files, or directories searched recursively for "
                             + "/".join(e.lstrip(".") for e in audio_extensions()))
    parser.add_argument("--out", type=Path, default=Path("diarization"),
                        help="output directory (default ./diarization)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="files diarized at once, each as its own sequence (default 4)")
    parser.add_argument("--offline", action="store_true",
                        help="use the server's offline Sortformer (diarizer_offline, exported with --offline-model): "
                             "one request per file, up to the server's limit (90 s by default), instead of "
                             "streaming through --preset")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG plots (faster)")
    parser.add_argument("--no-probs", action="store_true", help="leave per-frame probabilities out of the JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _server_options(parser)
    return parser


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} eval",
        description="Diarization error rate (DER) and Jaccard error rate (JER) per recording and in total "
                    "(pyannote.metrics). Recordings are matched by the RTTM uri field.",
        epilog="The collar is NIST md-eval's: excluded on each side of every reference boundary.",
    )
    parser.add_argument("--ref", required=True, type=Path, help="reference RTTM file or directory of *.rttm")
    parser.add_argument("--hyp", required=True, type=Path, help="hypothesis RTTM file or directory of *.rttm")
    parser.add_argument("--collar", type=float, default=0.25,
                        help="seconds excluded on each side of reference boundaries (default 0.25)")
    parser.add_argument("--skip-overlap", action="store_true", help="do not score overlapped speech")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores to this JSON file")
    return parser


def _split_parser() -> argparse.ArgumentParser:
    from .split import DEFAULT_BUFFER_TIME, DEFAULT_GAP_THRESHOLD, DEFAULT_MIN_DURATION

    parser = argparse.ArgumentParser(
        prog=f"{PROG} split",
        description="One wav per speaker (as long as the input, silence where the speaker is not kept), "
                    "with NeMo Curator SpeakerSeparation semantics: overlaps excluded with a buffer, "
                    "close segments merged, short ones dropped. Writes <out>/<uri>_<speaker>.wav and "
                    "<out>/<uri>_speakers.json.",
    )
    parser.add_argument("file", type=Path, help="the audio file")
    parser.add_argument("--rttm", required=True, type=Path, help="its diarization (RTTM)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--uri", default=None,
                        help="recording id in the RTTM (default: the file's stem, or the RTTM's only uri)")
    parser.add_argument("--keep-overlaps", action="store_true",
                        help="cut overlaps between speakers instead of excluding them (Curator "
                             "exclude_overlaps=False)")
    parser.add_argument("--min-duration", type=float, default=DEFAULT_MIN_DURATION,
                        help="drop segments shorter than this, seconds (default %(default)s)")
    parser.add_argument("--gap-threshold", type=float, default=DEFAULT_GAP_THRESHOLD,
                        help="merge a speaker's segments this close, seconds (default %(default)s)")
    parser.add_argument("--buffer-time", type=float, default=DEFAULT_BUFFER_TIME,
                        help="trimmed next to excluded overlaps, seconds (default %(default)s)")
    return parser


def _live_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} live",
        description="Diarize live audio: a microphone (needs sounddevice + PortAudio) or a wav file played "
                    "in real time. Finalized segments are printed as soon as they are final.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input-wav", type=Path, default=None, help="play this file instead of a microphone")
    source.add_argument("--device", default=None, help="sounddevice input device (name or index)")
    parser.add_argument("--sample-rate", type=int, default=16000, help="microphone sample rate (default 16000)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this much audio")
    parser.add_argument("--no-pace", action="store_true", help="--input-wav: send as fast as possible")
    parser.add_argument("--out", type=Path, default=None, help="write RTTM/JSON/PNG of the session here")
    parser.add_argument("--name", default="live", help="recording id of the outputs (default live)")
    _server_options(parser)
    return parser


# ---- helpers ---------------------------------------------------------------------------------------
def _segment_params(args: argparse.Namespace) -> Optional[Dict[str, object]]:
    params = {name: getattr(args, name) for name, _, _ in SEGMENT_OPTIONS if getattr(args, name) is not None}
    return params or None


def _client(args: argparse.Namespace) -> DiarizationClient:
    return DiarizationClient(args.url, protocol=args.protocol, preset=args.preset, timeout=args.timeout,
                             max_in_flight=max(1, args.max_in_flight))


def collect_files(inputs: Sequence[str]) -> List[Path]:
    """Audio files named or found (recursively) in directories, in order, without duplicates."""
    extensions = set(audio_extensions())
    files: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                raise ValueError(f"no audio files ({', '.join(sorted(extensions))}) in {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path} does not exist")
    unique: List[Path] = []
    seen = set()
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def unique_uris(files: Sequence[Path]) -> List[str]:
    """Recording ids from file stems; repeated stems get _2, _3 ... so outputs never overwrite."""
    used: Dict[str, int] = {}
    out = []
    for f in files:
        base = safe_uri(f.stem)
        n = used.get(base, 0) + 1
        used[base] = n
        out.append(base if n == 1 else f"{base}_{n}")
    return out


def write_outputs(result: Result, uri: str, out_dir: Path, png: bool = True, probs: bool = True,
                  extra: Optional[Dict[str, object]] = None) -> List[Path]:
    """<out>/<uri>.rttm, <uri>.json, (unless png=False) <uri>.png and (when the stream saved one) the
    speaker profile <uri>.profile.npz."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{uri}.rttm", out_dir / f"{uri}.json"]
    write_rttm(paths[0], uri, result.segments, result.speaker_names)
    write_json(paths[1], result, uri, include_probs=probs, extra=extra)
    if png:
        from .plot import plot_result

        paths.append(out_dir / f"{uri}.png")
        plot_result(result, paths[-1], title=uri)
    if result.profile is not None:
        paths.append(result.profile.save(out_dir / f"{uri}.profile.npz"))
    return paths


@dataclasses.dataclass
class FileOutcome:
    path: Path
    uri: str
    result: Optional[Result] = None
    seconds: float = 0.0
    error: Optional[str] = None
    outputs: List[Path] = dataclasses.field(default_factory=list)


def _console(stderr: bool = True):  # -> rich.console.Console
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


# ---- commands --------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    err = _console()
    if args.concurrency < 1:
        err.print("error: --concurrency must be >= 1")
        return EXIT_USAGE
    try:
        files = collect_files(args.inputs)
        clips = load_named_clips(args.enroll)
        profile = SpeakerProfile.load(args.profile) if args.profile is not None else None
        if profile is not None:
            from sortformer_triton.presets import get_preset

            profile.check_for(get_preset(args.preset))
        if args.offline and (clips or profile is not None or args.save_profile):
            raise ValueError("--enroll, --profile and --save-profile need a stream: they do not apply to --offline")
    except (ValueError, OSError) as exc:
        err.print(f"error: {exc}")
        return EXIT_USAGE
    client = _client(args)
    try:
        client.check_offline() if args.offline else client.check()
    except DiarizationError as exc:
        err.print(f"error: {exc}")
        client.close()
        return EXIT_USAGE
    params = _segment_params(args)
    uris = unique_uris(files)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("steps"), TimeElapsedColumn(), console=err,
                        disable=args.no_progress, transient=False)
    lock = threading.Lock()

    def work(path: Path, uri: str) -> FileOutcome:
        outcome = FileOutcome(path, uri)
        task = progress.add_task(uri, total=None)
        t0 = time.perf_counter()
        try:
            audio, rate = load_audio(path)

            def step(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            if args.offline:
                result = client.diarize_offline([audio], rate, segment_params=params)[0]
                step(1, 1)
            else:
                result = client.diarize(audio, rate, progress=step, segment_params=params, enroll=clips,
                                        profile=profile, save_profile=args.save_profile)
            outcome.result = result
            outcome.seconds = time.perf_counter() - t0
            extra = {"audio": {"path": os.fspath(path), "sample_rate": rate},
                     "server": {"url": client.url, "protocol": client.protocol},
                     "segment_params": params or {}, "processing_s": round(outcome.seconds, 3)}
            with lock:  # matplotlib's pyplot is not thread-safe
                outcome.outputs = write_outputs(result, uri, args.out, png=not args.no_png,
                                                probs=not args.no_probs, extra=extra)
            if not result.finished:
                outcome.error = f"stream ended before every frame was confirmed ({result.n_frames} frames)"
        except (DiarizationError, ValueError, OSError) as exc:
            outcome.error = str(exc)
            outcome.seconds = time.perf_counter() - t0
        progress.update(task, description=f"{uri} [{'failed' if outcome.error else 'done'}]")
        return outcome

    with progress:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            outcomes = list(pool.map(work, files, uris))
    client.close()
    _print_run_summary(outcomes, args.out)
    return EXIT_FAILED if any(o.error for o in outcomes) else EXIT_OK


def _print_run_summary(outcomes: Sequence[FileOutcome], out_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"diarization -> {out_dir}")
    for name in ("file", "audio s", "speakers", "segments", "time s", "RTF", "status"):
        table.add_column(name, justify="left" if name in ("file", "status") else "right")
    for o in outcomes:
        r = o.result
        if r is None:
            table.add_row(o.path.name, "-", "-", "-", f"{o.seconds:.2f}", "-", f"error: {o.error}")
            continue
        rtf = o.seconds / r.duration_s if r.duration_s > 0 else float("nan")
        speakers = ", ".join(r.label(k) for k in r.speakers) or "0"
        table.add_row(o.path.name, f"{r.duration_s:.2f}", speakers, str(len(r.segments)),
                      f"{o.seconds:.2f}", f"{rtf:.3f}", f"error: {o.error}" if o.error else "ok")
    _console(stderr=False).print(table)


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .evaluate import HEADER, describe, load_and_evaluate, report_rows

    err = _console()
    try:
        report = load_and_evaluate(args.ref, args.hyp, collar=args.collar, skip_overlap=args.skip_overlap)
    except ValueError as exc:
        err.print(f"error: {exc}")
        return EXIT_USAGE
    note = describe(report)
    if note:
        err.print(f"warning: {note}")
    table = Table(title=f"DER / JER (collar {args.collar:g} s each side"
                        f"{', overlap skipped' if args.skip_overlap else ''})")
    for name in HEADER:
        table.add_column(name, justify="left" if name == "recording" else "right")
    rows = report_rows(report)
    for k, row in enumerate(rows):
        table.add_row(*row, end_section=k == len(rows) - 2)
    _console(stderr=False).print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return EXIT_OK


def cmd_split(args: argparse.Namespace) -> int:
    from .split import SplitParams, split_file

    err = _console()
    try:
        params = SplitParams(exclude_overlaps=not args.keep_overlaps, min_duration=args.min_duration,
                             gap_threshold=args.gap_threshold, buffer_time=args.buffer_time)
        if not args.file.is_file():
            raise ValueError(f"{args.file} does not exist")
        turns = read_rttm(args.rttm)
        uris = sorted({t.uri for t in turns})
        uri = args.uri or (safe_uri(args.file.stem) if safe_uri(args.file.stem) in uris
                           else uris[0] if len(uris) == 1 else None)
        if uri is None:
            raise ValueError(f"{args.rttm} holds recordings {', '.join(uris) or '(none)'}; "
                             f"none is {safe_uri(args.file.stem)!r}: choose one with --uri")
        if uris and uri not in uris:
            raise ValueError(f"{args.rttm} has no recording {uri!r} (it has {', '.join(uris)})")
        entries = split_file(args.file, [t for t in turns if t.uri == uri], args.out, params, uri=uri)
    except (ValueError, OSError) as exc:
        err.print(f"error: {exc}")
        return EXIT_USAGE
    from rich.table import Table

    table = Table(title=f"{args.file} -> {args.out}")
    for name in ("speaker", "speech s", "segments", "file"):
        table.add_column(name)
    for e in entries:
        table.add_row(e.speaker_id, f"{e.duration_sec:.2f}", str(len(e.segments)), e.audio_filepath)
    _console(stderr=False).print(table)
    if not entries:
        err.print("warning: no speaker kept (all speech was overlapped or shorter than --min-duration)")
    return EXIT_OK


def cmd_live(args: argparse.Namespace) -> int:
    from .live import microphone_blocks, run_live, wav_blocks

    err = _console()
    client = _client(args)
    try:
        client.check()
        if args.input_wav is not None:
            blocks = wav_blocks(os.fspath(args.input_wav), pace=not args.no_pace, seconds=args.seconds)
        else:
            blocks = microphone_blocks(args.device, args.sample_rate, seconds=args.seconds)
        profile = SpeakerProfile.load(args.profile) if args.profile is not None else None
        result = run_live(client, blocks, enroll=load_named_clips(args.enroll), profile=profile,
                          save_profile=args.save_profile)
    except (DiarizationError, RuntimeError, ValueError, OSError) as exc:
        err.print(f"error: {exc}")
        return EXIT_USAGE
    finally:
        client.close()
    err.print(f"{result.duration_s:.1f} s streamed, {len(result.segments)} segments, "
              f"speakers {', '.join(result.label(s) for s in result.speakers) or 'none'}")
    if args.out is not None:
        for path in write_outputs(result, safe_uri(args.name), args.out):
            err.print(f"wrote {path}")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = "run"
    if args_list and args_list[0] in COMMANDS:
        command = args_list.pop(0)
    parsers = {"run": _run_parser, "eval": _eval_parser, "split": _split_parser, "live": _live_parser}
    handlers = {"run": cmd_run, "eval": cmd_eval, "split": cmd_split, "live": cmd_live}
    try:
        args = parsers[command]().parse_args(args_list)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    return handlers[command](args)
