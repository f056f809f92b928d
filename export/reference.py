"""References for parity: NeMo's own streaming loop, and a driver that streams audio through the
exported graphs (torch modules or ONNX sessions) exactly as Triton would, many streams per batch."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from sortformer_triton import contract
from sortformer_triton.presets import Preset
from sortformer_triton.protocol import PredictionAssembler, iter_steps


def configure_streaming(model, preset: Preset) -> None:
    """Set NeMo's streaming parameters to a preset (as NeMo's streaming tutorial does)."""
    m = model.sortformer_modules
    m.chunk_len = preset.chunk_len
    m.chunk_right_context = preset.right_context
    m.chunk_left_context = preset.left_context
    m.fifo_len = preset.fifo_len
    m.spkcache_update_period = preset.spkcache_update_period
    m.spkcache_len = preset.spkcache_len
    model.async_streaming = True


@torch.no_grad()
def nemo_features(model, audio: np.ndarray) -> np.ndarray:
    """NeMo's preprocessor on the whole recording: [mel frames, 128]."""
    x = torch.from_numpy(np.asarray(audio, dtype=np.float32)).unsqueeze(0)
    feats, length = model.process_signal(audio_signal=x, audio_signal_length=torch.tensor([x.shape[1]]))
    return feats[0, :, : int(length[0])].T.numpy()


@dataclasses.dataclass
class NemoResult:
    preds: np.ndarray  # [frames, 4]
    steps: int
    compressions: int


@contextlib.contextmanager
def _count_compressions(model):
    modules = model.sortformer_modules
    original = modules._compress_spkcache
    counter = {"n": 0}

    def counting(*args, **kwargs):
        counter["n"] += int(kwargs.get("emb_seq", args[0] if args else None).shape[0])
        return original(*args, **kwargs)

    modules._compress_spkcache = counting
    try:
        yield counter
    finally:
        modules._compress_spkcache = original


@torch.no_grad()
def nemo_stream(model, preset: Preset, audio: np.ndarray) -> NemoResult:
    """NeMo's streaming loop (``forward_streaming`` with async_streaming=True) on one recording,
    driven step by step through ``forward_streaming_step`` exactly as ``forward_streaming`` does."""
    configure_streaming(model, preset)
    x = torch.from_numpy(np.asarray(audio, dtype=np.float32)).unsqueeze(0)
    feats, length = model.process_signal(audio_signal=x, audio_signal_length=torch.tensor([x.shape[1]]))
    feats = feats[:, :, : int(length.max())]
    modules = model.sortformer_modules
    state = modules.init_streaming_state(batch_size=1, async_streaming=True, device=model.device)
    total = torch.zeros((1, 0, modules.n_spk))
    offset = torch.zeros((1,), dtype=torch.long)
    steps = 0
    with _count_compressions(model) as counter:
        for _, chunk, chunk_len, left, right in modules.streaming_feat_loader(
            feat_seq=feats, feat_seq_length=length, feat_seq_offset=offset
        ):
            state, total = model.forward_streaming_step(
                processed_signal=chunk, processed_signal_length=chunk_len, streaming_state=state,
                total_preds=total, left_offset=left, right_offset=right,
            )
            steps += 1
    return NemoResult(preds=total[0].numpy(), steps=steps, compressions=counter["n"])


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


@dataclasses.dataclass
class StreamResult:
    preds: np.ndarray
    features: np.ndarray  # every feature frame the preprocessor produced, in order (chunk part only)
    requests: int
    finished: bool


def stream_through(pre: StatefulGraph, step: StatefulGraph, preset: Preset, audios: Sequence[np.ndarray],
                   start_at: Optional[Sequence[int]] = None) -> List[StreamResult]:
    """Stream several recordings concurrently; stream i starts at global step start_at[i]. Every global
    step batches the requests of all streams active at that step (different ages in one batch)."""
    start_at = list(start_at or [0] * len(audios))
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
            contract.AUDIO_LENGTH: np.array([[r.valid] for r in reqs], dtype=np.int32),
        })
        step_in = {n: pre_out[n] for n in (contract.FEATURES, contract.FEATURE_LENGTH, contract.LEFT_CONTEXT, contract.CHUNK_INDEX)}
        out = step.run(ids, starts, step_in)
        for k, i in enumerate(rows):
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
                     requests=len(p), finished=a.finished)
        for a, f, p in zip(asm, feats, plans)
    ]


def torch_fn(module: torch.nn.Module, io: contract.ModelIO, start_first: bool = True) -> GraphFn:
    """Call a graph module with named numpy feeds, returning named numpy outputs."""
    in_names = [t.name for t in io.inputs] + [contract.START] + [s.name for s in io.states]
    out_names = [t.name for t in io.outputs] + [contract.STATE_OUT_PREFIX + s.name for s in io.states]

    @torch.no_grad()
    def fn(feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in in_names]
        outs = module(*args)
        return {n: o.numpy() for n, o in zip(out_names, outs)}

    return fn


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


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    return float(np.max(np.abs(a - b))) if a.size else 0.0


@torch.no_grad()
def exact_features(model, audio: np.ndarray) -> np.ndarray:
    """NeMo's feature pipeline evaluated in float64: the yardstick for both float32 implementations
    (NeMo's own torch.stft rounding reaches ~2e-4 in near-silent log-mel bands)."""
    fz = model.preprocessor.featurizer
    x = torch.from_numpy(np.asarray(audio, dtype=np.float64)).unsqueeze(0)
    x = torch.cat((x[:, :1], x[:, 1:] - float(fz.preemph) * x[:, :-1]), dim=1)
    spec = torch.stft(x, fz.n_fft, fz.hop_length, fz.win_length, center=True, window=fz.window.double(),
                      return_complex=True, pad_mode="constant")
    power = spec.abs() ** 2
    mel = torch.log(torch.matmul(fz.fb.double()[0], power) + float(fz.log_zero_guard_value_fn(torch.zeros(1))))
    n = audio.shape[0] // fz.hop_length
    return mel[0, :, :n].T.numpy()
