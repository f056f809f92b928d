"""Run the exported stateful graphs in-process, many streams per batch, exactly as Triton would.

numpy + onnxruntime only (no torch): used by parity, the end-to-end tests and the load-test report as
the reference the server must equal. State is kept per sequence like Triton's implicit state: zeros on
START, the previous ``out_<name>`` otherwise, dropped at END.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import contract
from .presets import Preset
from .protocol import PredictionAssembler, iter_steps

# ---- streaming through the exported graphs --------------------------------------------------------
GraphFn = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]


class StatefulGraph:
    """Run a stateful graph for many sequences, keeping each one's state like Triton's implicit state."""

    def __init__(self, fn: GraphFn, io: contract.ModelIO):
        self.fn = fn
        self.io = io
        self.states: Dict[int, Dict[str, np.ndarray]] = {}

    def run(self, seq_ids: Sequence[int], starts: Sequence[bool], feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        batch = dict(feeds)
        batch[contract.START] = np.array([[int(s)] for s in starts], dtype=np.int32)
        for st in self.io.states:
            rows = []
            for sid, start in zip(seq_ids, starts):
                if start or sid not in self.states:
                    rows.append(np.zeros(st.dims, dtype=st.dtype))
                else:
                    rows.append(self.states[sid][st.name])
            batch[st.name] = np.stack(rows)
        out = self.fn(batch)
        for i, sid in enumerate(seq_ids):
            self.states[sid] = {st.name: out[contract.STATE_OUT_PREFIX + st.name][i] for st in self.io.states}
        return {t.name: out[t.name] for t in self.io.outputs}

    def end(self, seq_id: int) -> None:
        self.states.pop(seq_id, None)


Profile = Tuple[np.ndarray, np.ndarray]  # (PROFILE [n] float32, PROFILE_HEADER [6] int64) of one stream


@dataclasses.dataclass
class StreamResult:
    preds: np.ndarray
    features: np.ndarray  # every feature frame the preprocessor produced, in order (chunk part only)
    requests: int
    finished: bool
    saved: Optional[Profile] = None  # SAVED_PROFILE / _HEADER of the request save_at named


def profile_feeds(rows: Sequence[Optional[Profile]], flags: Sequence[int]) -> Dict[str, np.ndarray]:
    """PROFILE / PROFILE_HEADER of one batch: each row's profile (restore) or none, with its flags; rows
    without a profile get zeros of the batch's profile length (a batch has one shape, as in Triton)."""
    n = max([len(r[0]) for r in rows if r is not None] or [1])
    profile = np.zeros((len(rows), n), np.float32)
    header = np.zeros((len(rows), contract.PROFILE_HEADER_LEN), np.int64)
    for k, (row, flag) in enumerate(zip(rows, flags)):
        if row is not None:
            profile[k, :len(row[0])] = row[0]
            header[k] = row[1]
        header[k, 0] = flag
    return {contract.PROFILE: profile, contract.PROFILE_HEADER: header}


def stream_through(pre: StatefulGraph, step: StatefulGraph, preset: Preset, audios: Sequence[np.ndarray],
                   start_at: Optional[Sequence[int]] = None,
                   profiles: Optional[Sequence[Optional[Profile]]] = None,
                   save_at: Optional[Sequence[Optional[int]]] = None) -> List[StreamResult]:
    """Stream several recordings concurrently; stream i starts at global step start_at[i]. Every global
    step batches the requests of all streams active at that step (different ages in one batch).
    ``profiles[i]``: stream i STARTs from this saved speaker profile; ``save_at[i]``: stream i saves its
    profile at this request (-1: the last)."""
    start_at = list(start_at or [0] * len(audios))
    profiles = list(profiles or [None] * len(audios))
    save_at = list(save_at or [None] * len(audios))
    saved: List[Optional[Profile]] = [None] * len(audios)
    plans = [list(iter_steps(preset, a)) for a in audios]
    asm = [PredictionAssembler() for _ in audios]
    feats: List[List[np.ndarray]] = [[] for _ in audios]
    horizon = max(s + len(p) for s, p in zip(start_at, plans))
    for g in range(horizon):
        rows = [i for i in range(len(audios)) if 0 <= g - start_at[i] < len(plans[i])]
        if not rows:
            continue
        reqs = [plans[i][g - start_at[i]] for i in rows]
        ids = [i + 1 for i in rows]
        starts = [r.start for r in reqs]
        pre_out = pre.run(ids, starts, {
            contract.AUDIO: np.stack([r.audio for r in reqs]),
            contract.AUDIO_LENGTH: np.array([[r.valid] for r in reqs], dtype=contract.AUDIO_LENGTH_TENSOR.dtype),
        })
        step_in = {n: pre_out[n] for n in (contract.FEATURES, contract.FEATURE_LENGTH, contract.LEFT_CONTEXT, contract.CHUNK_INDEX)}
        ages = [g - start_at[i] for i in rows]
        saving = [save_at[i] is not None and age == save_at[i] % len(plans[i]) for i, age in zip(rows, ages)]
        restoring = [profiles[i] if age == 0 else None for i, age in zip(rows, ages)]
        step_in.update(profile_feeds(restoring, [
            (contract.PROFILE_RESTORE if r is not None else 0) + (contract.PROFILE_SAVE if s else 0)
            for r, s in zip(restoring, saving)]))
        out = step.run(ids, starts, step_in)
        for k, i in enumerate(rows):
            if saving[k]:
                saved[i] = (out[contract.SAVED_PROFILE][k].copy(), out[contract.SAVED_PROFILE_HEADER][k].copy())
            flen, left = int(pre_out[contract.FEATURE_LENGTH][k, 0]), int(pre_out[contract.LEFT_CONTEXT][k, 0])
            if flen > 0:
                left_mel = left * 8
                chunk_mel = min(flen - left_mel, preset.chunk_mel_frames)
                feats[i].append(pre_out[contract.FEATURES][k, left_mel : left_mel + chunk_mel])
            asm[i].add(out[contract.CONFIRMED][k], int(out[contract.N_CONFIRMED][k, 0]), int(out[contract.FRAME_OFFSET][k, 0]),
                       out[contract.TENTATIVE][k], int(out[contract.N_TENTATIVE][k, 0]), bool(pre_out[contract.FINISHED][k, 0]))
            if reqs[k].end:
                pre.end(i + 1)
                step.end(i + 1)
    return [
        StreamResult(preds=a.confirmed, features=np.concatenate(f) if f else np.zeros((0, 128), np.float32),
                     requests=len(p), finished=a.finished, saved=sv)
        for a, f, p, sv in zip(asm, feats, plans, saved)
    ]


def ort_fn(path: str, threads: int = 2) -> GraphFn:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}

    def fn(feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))

    return fn


def repository_graphs(local_root: "str | Path", preset: Preset, emb_dim: int,
                      threads: int = 2) -> Tuple[StatefulGraph, StatefulGraph]:
    """The preset's preprocessor and sortformer graphs of an exported repository flavour (``.../local``)."""
    root = Path(local_root)

    def graph(name: str, io: contract.ModelIO) -> StatefulGraph:
        return StatefulGraph(ort_fn(str(root / name / "1" / "model.onnx"), threads), io)

    return (graph(contract.preprocessor_name(preset), contract.preprocessor_io(preset)),
            graph(contract.sortformer_name(preset), contract.sortformer_io(preset, emb_dim)))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    return float(np.max(np.abs(a - b))) if a.size else 0.0
