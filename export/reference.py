"""References for parity: NeMo's own streaming loop, and a driver that streams audio through the
exported graphs (torch modules or ONNX sessions) exactly as Triton would, many streams per batch."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Optional

import numpy as np
import torch

from sortformer_triton import contract
from sortformer_triton.presets import Preset
from sortformer_triton.inprocess import (  # noqa: F401 - re-exported for export.parity and the tests
    GraphFn, StatefulGraph, StreamResult, max_abs_diff, ort_fn, stream_through,
)


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


# A silence decision (sum of a popped frame's predictions < sil_threshold) this close to its threshold is
# decided by float rounding: two float implementations (two onnxruntime/torch builds, two CPUs) may take
# either side, and the streams differ from the next step on (docs/parity.md).
BOUNDARY_MARGIN = 1e-5


@dataclasses.dataclass
class NemoResult:
    preds: np.ndarray  # [frames, 4]
    steps: int
    compressions: int
    # the first step whose silence decision lay within BOUNDARY_MARGIN of sil_threshold, and that margin
    near_boundary_step: Optional[int] = None
    near_boundary_margin: Optional[float] = None


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


@contextlib.contextmanager
def _watch_silence_boundaries(model, step_of):
    """Record (step, |sum(preds) - sil_threshold|) of every silence decision NeMo makes."""
    modules = model.sortformer_modules
    original = modules._get_silence_profile
    seen = []

    def watching(mean_sil_emb, n_sil_frames, emb_seq, preds):
        sums = preds.sum(dim=2)
        if sums.numel():
            seen.append((step_of(), float((sums - modules.sil_threshold).abs().min())))
        return original(mean_sil_emb, n_sil_frames, emb_seq, preds)

    modules._get_silence_profile = watching
    try:
        yield seen
    finally:
        modules._get_silence_profile = original


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
    with _count_compressions(model) as counter, _watch_silence_boundaries(model, lambda: steps) as silences:
        for _, chunk, chunk_len, left, right in modules.streaming_feat_loader(
            feat_seq=feats, feat_seq_length=length, feat_seq_offset=offset
        ):
            state, total = model.forward_streaming_step(
                processed_signal=chunk, processed_signal_length=chunk_len, streaming_state=state,
                total_preds=total, left_offset=left, right_offset=right,
            )
            steps += 1
    near = [(step, margin) for step, margin in silences if margin < BOUNDARY_MARGIN]
    return NemoResult(preds=total[0].numpy(), steps=steps, compressions=counter["n"],
                      near_boundary_step=near[0][0] if near else None,
                      near_boundary_margin=near[0][1] if near else None)


def torch_fn(module: torch.nn.Module, io: contract.ModelIO) -> GraphFn:
    """Call a graph module with named numpy feeds, returning named numpy outputs."""
    in_names = [t.name for t in io.inputs] + [contract.START] + [s.name for s in io.states]
    out_names = [t.name for t in io.outputs] + [contract.STATE_OUT_PREFIX + s.name for s in io.states]

    @torch.no_grad()
    def fn(feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in in_names]
        outs = module(*args)
        return {n: o.numpy() for n, o in zip(out_names, outs)}

    return fn


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
