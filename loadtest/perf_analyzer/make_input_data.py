"""perf_analyzer ``--input-data`` JSON for sequence runs against ``diarizer_<preset>``.

One file per preset: ``{"data": [stream, stream, ...]}``, each stream the complete list of requests a
client sends for one synthetic conversation (``sortformer_triton.samples.conversation``), exactly as
``sortformer_triton.protocol.iter_steps`` cuts it: the audio steps, the end-of-audio step and the flush
steps (0 valid samples). perf_analyzer runs one stream per sequence and puts END on its last request,
so every sequence ends properly and every frame gets confirmed.

Each request has ``AUDIO`` (FP32 ``[step_samples]``, zero-padded; base64 of little-endian float32 by
default, exact and ~4x smaller than a JSON list) and ``AUDIO_LENGTH`` (INT64 ``[1]``, the valid sample
count). Shapes exclude the batch dimension (the ensembles have ``max_batch_size`` > 0).

    python -m loadtest.perf_analyzer.make_input_data --preset low --streams 4 --out results/pa_input
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from sortformer_triton import contract
from sortformer_triton.presets import SAMPLE_RATE, Preset, requests_for
from sortformer_triton.protocol import iter_steps
from sortformer_triton.samples import conversation

from ..common import RESULTS_ROOT, parse_presets

# Default audio per stream: long enough that the FIFO and speaker cache fill (steady-state cost), and at
# least a few steps for the long-chunk presets.
DEFAULT_SECONDS: Dict[str, float] = {"ultra_low": 30.0, "low": 30.0, "high": 60.0, "very_high": 90.0}
FALLBACK_SECONDS = 30.0
ENCODINGS = ("b64", "content")


def default_seconds(preset: Preset) -> float:
    return DEFAULT_SECONDS.get(preset.name, max(FALLBACK_SECONDS, 3 * preset.step_seconds))


def stream_seconds(index: int, seconds: float) -> float:
    """Length of stream ``index``: up to ~10 % shorter than ``seconds``, so the streams' ends fall at
    different step boundaries."""
    return seconds * (1.0 - 0.1 * (index % 4) / 3.0)


def stream_samples(index: int, seconds: float) -> int:
    """Samples of stream ``index`` (``samples.conversation`` makes round(seconds x rate) of them)."""
    return int(round(stream_seconds(index, seconds) * SAMPLE_RATE))


def stream_audio(index: int, seconds: float, seed: int = 0) -> np.ndarray:
    """The audio of stream ``index``: a distinct conversation (own seed and speaker count)."""
    audio, _ = conversation(stream_seconds(index, seconds), n_speakers=2 + index % 3, seed=seed + 1000 * index)
    if audio.size != stream_samples(index, seconds):
        raise AssertionError(f"conversation() returned {audio.size} samples, expected "
                             f"{stream_samples(index, seconds)}")
    return audio


def _tensor(array: np.ndarray, encoding: str) -> Dict[str, object]:
    if encoding == "b64":
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        return {"b64": base64.b64encode(data).decode("ascii"), "shape": list(array.shape)}
    return {"content": [float(x) for x in array.reshape(-1)], "shape": list(array.shape)}


def stream_steps(preset: Preset, audio: np.ndarray, encoding: str = "b64") -> List[Dict[str, object]]:
    """perf_analyzer's steps of one stream (every request of ``iter_steps``, flush steps included)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    return [
        {
            contract.AUDIO: _tensor(step.audio, encoding),
            contract.AUDIO_LENGTH: {"content": [int(step.valid)], "shape": [1]},
        }
        for step in iter_steps(preset, audio)
    ]


def input_data(preset: Preset, streams: int = 4, seconds: Optional[float] = None, seed: int = 0,
               encoding: str = "b64") -> Dict[str, object]:
    """The ``--input-data`` document for ``preset``: ``streams`` distinct streams."""
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams}")
    seconds = default_seconds(preset) if seconds is None else float(seconds)
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return {"data": [stream_steps(preset, stream_audio(i, seconds, seed), encoding)
                     for i in range(streams)]}


def expected_steps(preset: Preset, streams: int = 4, seconds: Optional[float] = None) -> List[int]:
    """Requests per stream that ``input_data`` must hold (``presets.requests_for`` of each audio)."""
    seconds = default_seconds(preset) if seconds is None else float(seconds)
    return [requests_for(preset, stream_samples(i, seconds)) for i in range(streams)]


def input_data_path(out_dir: Path, preset: Preset, streams: int, seconds: Optional[float], seed: int,
                    encoding: str = "b64") -> Path:
    seconds = default_seconds(preset) if seconds is None else float(seconds)
    return Path(out_dir) / f"{contract.ensemble_name(preset)}_{streams}x{seconds:g}s_seed{seed}_{encoding}.json"


def write_input_data(out_dir: Path, preset: Preset, streams: int = 4, seconds: Optional[float] = None,
                     seed: int = 0, encoding: str = "b64", overwrite: bool = False) -> Path:
    """Write (or reuse: same name = same content, it is deterministic) the file for ``preset``."""
    path = input_data_path(out_dir, preset, streams, seconds, seed, encoding)
    if path.is_file() and not overwrite:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(input_data(preset, streams, seconds, seed, encoding), fh, separators=(",", ":"))
    tmp.replace(path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.perf_analyzer.make_input_data",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="preset(s): repeatable, comma list or 'all' (default low)")
    ap.add_argument("--streams", type=int, default=4, help="distinct streams per file (default 4)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="audio per stream (default per preset: " +
                         ", ".join(f"{k} {v:g} s" for k, v in DEFAULT_SECONDS.items()) + ")")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encoding", choices=ENCODINGS, default="b64",
                    help="AUDIO as base64 float32 (default) or a JSON list")
    ap.add_argument("--out", type=Path, default=RESULTS_ROOT / "perf_analyzer" / "input_data")
    args = ap.parse_args(argv)
    for preset in parse_presets(args.preset):
        path = write_input_data(args.out, preset, args.streams, args.seconds, args.seed, args.encoding,
                                overwrite=True)
        steps = expected_steps(preset, args.streams, args.seconds)
        print(f"{path}: {len(steps)} streams, steps per stream {steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
