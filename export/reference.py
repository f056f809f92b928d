"""References for parity: NeMo's own streaming loop, and a driver that streams audio through the
exported graphs (torch modules or ONNX sessions) exactly as Triton would, many streams per batch."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from sortformer_triton import contract
from sortformer_triton.presets import Preset
from sortformer_triton.inprocess import (  # noqa: F401 - re-exported for export.parity and the tests
    GraphFn, StatefulGraph, StreamResult, max_abs_diff, ort_fn, stream_through,
)

from .graphs import stable_topk


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


# A decision this close to its threshold (a silence sum vs sil_threshold, a probability vs 0.5, a score vs 0,
# the gap at a top-k cut) is decided by float rounding: two float implementations (two onnxruntime/torch
# builds, two CPUs) may take either side, and the streams differ from the next step on (docs/parity.md).
# A value exactly *on* the boundary is not such a case: both sides compute it exactly and compare it the same.
BOUNDARY_MARGIN = 1e-5
# top-k cuts: scores are O(1) sums of logs; two float implementations differ by a few float32 ulps there
TOPK_MARGIN = 1e-6

TOPK_RULES = ("deterministic", "default")
DECISIONS = ("silence", "speech", "positive", "topk")
# a compression whose result changes when its score logs are correctly rounded (as the exported graphs
# compute them) instead of torch's float32 log: decided by the last ulp of a log
LOG_ROUNDING = "log_rounding"


@dataclasses.dataclass
class Decisions:
    """Every discrete decision NeMo's cache update made in one stream, and how close each came to its boundary."""

    # per kind: the smallest distance to the boundary seen (exact landings count as 0), the step it came at,
    # how many values landed exactly on it, and the first step with a near-boundary (0 < d < BOUNDARY_MARGIN) one
    margin: Dict[str, float] = dataclasses.field(default_factory=lambda: {k: float("inf") for k in DECISIONS})
    margin_step: Dict[str, Optional[int]] = dataclasses.field(default_factory=lambda: {k: None for k in DECISIONS})
    exact: Dict[str, int] = dataclasses.field(default_factory=lambda: {k: 0 for k in DECISIONS})
    near_step: Dict[str, Optional[int]] = dataclasses.field(default_factory=lambda: {k: None for k in DECISIONS})
    # the first compression whose result changes with correctly rounded score logs (LOG_ROUNDING)
    log_rounding_step: Optional[int] = None
    # integer decisions: a chunk that filled the FIFO exactly (no pop), pops that filled the speaker cache
    # exactly (no compression), and the step of the first compression
    fifo_exact_steps: List[int] = dataclasses.field(default_factory=list)
    cache_exact_steps: List[int] = dataclasses.field(default_factory=list)
    first_compression_step: Optional[int] = None

    def see(self, kind: str, step: int, distances: torch.Tensor) -> None:
        d = distances[torch.isfinite(distances)].abs()
        if not d.numel():
            return
        self.exact[kind] += int((d == 0).sum())
        smallest = float(d.min())
        if smallest < self.margin[kind]:
            self.margin[kind], self.margin_step[kind] = smallest, step
        near = d[(d > 0) & (d < (TOPK_MARGIN if kind == "topk" else BOUNDARY_MARGIN))]
        if near.numel() and self.near_step[kind] is None:
            self.near_step[kind] = step

    def first_near(self, log_rounding: bool = True) -> Tuple[Optional[int], Optional[str]]:
        """The first step with a near-boundary decision of any kind (``log_rounding``: counting compressions
        decided by the last ulp of a log), and its kind."""
        hits = [(s, k) for k, s in self.near_step.items() if s is not None]
        if log_rounding and self.log_rounding_step is not None:
            hits.append((self.log_rounding_step, LOG_ROUNDING))
        return min(hits) if hits else (None, None)

    def as_dict(self) -> Dict[str, object]:
        return {
            "margin": {k: (None if v == float("inf") else v) for k, v in self.margin.items()},
            "margin_step": dict(self.margin_step),
            "exact_landings": dict(self.exact),
            "near_boundary_step": {k: v for k, v in self.near_step.items() if v is not None},
            "log_rounding_step": self.log_rounding_step,
            "fifo_exact_steps": len(self.fifo_exact_steps), "cache_exact_steps": len(self.cache_exact_steps),
            "first_compression_step": self.first_compression_step,
        }


@dataclasses.dataclass
class NemoResult:
    preds: np.ndarray  # [frames, 4]
    steps: int
    compressions: int
    # per compression: how many scores were tied at a top-k cut that the tie-break rule decided
    ties: List[int] = dataclasses.field(default_factory=list)
    decisions: Decisions = dataclasses.field(default_factory=Decisions)


def _tied_at_cut(x: torch.Tensor, k: int, dim: int) -> Tuple[int, torch.Tensor]:
    """Scores tied at the k-th largest value where the cut falls inside the tie (the rule decides which stay),
    and the gaps between the k-th and the (k+1)-th value of every row (0 for a tie)."""
    v = torch.sort(x, dim=dim, descending=True).values.movedim(dim, -1)
    xs = x.movedim(dim, -1)
    kth = v[..., k - 1 : k]
    decided = torch.isfinite(kth[..., 0]) & ((xs == kth).sum(-1) > k - (xs > kth).sum(-1))
    tied = int(((xs == kth).sum(-1) * decided).sum())
    gaps = (v[..., k - 1] - v[..., k]) if v.shape[-1] > k else v.new_zeros(0)
    return tied, gaps


@contextlib.contextmanager
def _watch_compressions(model, topk: str, decisions: Decisions, step_of):
    """Count compressions and their decided ties; with ``topk="deterministic"``, run NeMo's compression with
    :func:`export.graphs.stable_topk` (the exported graphs' rule) in place of ``torch.topk`` (patched only while ``_compress_spkcache`` runs)."""
    if topk not in TOPK_RULES:
        raise ValueError(f"topk must be one of {TOPK_RULES}")
    modules = model.sortformer_modules
    original_compress, original_disable = modules._compress_spkcache, modules._disable_low_scores
    ties: List[int] = []
    torch_topk, torch_log = torch.topk, torch.log
    watching = {"on": True}

    def rounded_log(x, *args, **kwargs):
        return torch_log(x.double(), *args, **kwargs).to(x.dtype)

    def counting_topk(input, k, dim=-1, largest=True, sorted=True):  # noqa: A002
        if watching["on"]:
            tied, gaps = _tied_at_cut(input, k, dim)
            ties[-1] += tied
            decisions.see("topk", step_of(), gaps[gaps > 0])
        if topk == "deterministic" and largest:
            return stable_topk(input, k, dim=dim)
        return torch_topk(input, k, dim=dim, largest=largest, sorted=sorted)

    def compressing(*args, **kwargs):
        emb = kwargs.get("emb_seq", args[0] if args else None)
        for _ in range(int(emb.shape[0])):
            ties.append(0)
        if decisions.first_compression_step is None:
            decisions.first_compression_step = step_of()
        torch.topk = counting_topk
        try:
            out = original_compress(*args, **kwargs)
            if decisions.log_rounding_step is None:  # the same compression with correctly rounded logs
                watching["on"], torch.log = False, rounded_log
                try:
                    again = original_compress(*args, **kwargs)
                finally:
                    watching["on"], torch.log = True, torch_log
                if not all(torch.equal(a, b) for a, b in zip(out[:2], again[:2])):
                    decisions.log_rounding_step = step_of()
            return out
        finally:
            torch.topk = torch_topk

    def disabling(preds, scores, min_pos_scores_per_spk):
        if watching["on"]:
            decisions.see("speech", step_of(), preds - 0.5)
            not_speech = torch.full_like(scores, float("inf"))
            decisions.see("positive", step_of(), torch.where(preds > 0.5, scores, not_speech))
        return original_disable(preds, scores, min_pos_scores_per_spk)

    modules._compress_spkcache, modules._disable_low_scores = compressing, disabling
    try:
        yield ties
    finally:
        modules._compress_spkcache, modules._disable_low_scores = original_compress, original_disable
        torch.topk, torch.log = torch_topk, torch_log


@contextlib.contextmanager
def _watch_silence(model, decisions: Decisions, step_of):
    """Record |sum(preds) - sil_threshold| of every silence decision NeMo makes."""
    modules = model.sortformer_modules
    original = modules._get_silence_profile

    def watching(mean_sil_emb, n_sil_frames, emb_seq, preds):
        decisions.see("silence", step_of(), preds.sum(dim=2) - modules.sil_threshold)
        return original(mean_sil_emb, n_sil_frames, emb_seq, preds)

    modules._get_silence_profile = watching
    try:
        yield
    finally:
        modules._get_silence_profile = original


@torch.no_grad()
def nemo_stream(model, preset: Preset, audio: np.ndarray, topk: str = "deterministic",
                features: Optional[np.ndarray] = None, profile: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> NemoResult:
    """NeMo's streaming loop (``forward_streaming`` with async_streaming=True) on one recording, driven step
    by step through ``forward_streaming_step`` exactly as ``forward_streaming`` does.

    ``topk="deterministic"`` (the parity reference): NeMo with its top-k ties broken by lower index first;
    ``"default"``: NeMo as shipped (torch.topk orders ties as its kernel happens to). ``features``
    ([frames, 128]) replaces NeMo's own preprocessor output, e.g. with :func:`exact_features`. ``profile``
    (PROFILE, PROFILE_HEADER as a graph saved them) is NeMo's streaming state at the start instead of
    ``init_streaming_state``'s zeros: the loop continued from a saved speaker state on new audio.
    """
    configure_streaming(model, preset)
    x = torch.from_numpy(np.asarray(audio, dtype=np.float32)).unsqueeze(0)
    feats, length = model.process_signal(audio_signal=x, audio_signal_length=torch.tensor([x.shape[1]]))
    feats = feats[:, :, : int(length.max())]
    if features is not None:
        if features.shape != (feats.shape[2], feats.shape[1]):
            raise ValueError(f"features {features.shape} do not match NeMo's {(feats.shape[2], feats.shape[1])}")
        feats = torch.from_numpy(np.ascontiguousarray(features.T, dtype=np.float32)).unsqueeze(0)
    modules = model.sortformer_modules
    state = modules.init_streaming_state(batch_size=1, async_streaming=True, device=model.device)
    if profile is not None:
        restore_state(state, preset, *profile)
    total = torch.zeros((1, 0, modules.n_spk))
    offset = torch.zeros((1,), dtype=torch.long)
    decisions = Decisions()
    steps = 0
    with _watch_compressions(model, topk, decisions, lambda: steps) as ties, \
            _watch_silence(model, decisions, lambda: steps):
        for _, chunk, chunk_len, left, right in modules.streaming_feat_loader(
            feat_seq=feats, feat_seq_length=length, feat_seq_offset=offset
        ):
            sl, fl, n = int(state.spkcache_lengths[0]), int(state.fifo_lengths[0]), len(ties)
            state, total = model.forward_streaming_step(
                processed_signal=chunk, processed_signal_length=chunk_len, streaming_state=state,
                total_preds=total, left_offset=left, right_offset=right,
            )
            sl2, fl2 = int(state.spkcache_lengths[0]), int(state.fifo_lengths[0])
            if sl2 == sl and fl2 == preset.fifo_len > fl:
                decisions.fifo_exact_steps.append(steps)
            if sl2 == preset.spkcache_len > sl and len(ties) == n:
                decisions.cache_exact_steps.append(steps)
            steps += 1
    return NemoResult(preds=total[0].numpy(), steps=steps, compressions=len(ties), ties=list(ties),
                      decisions=decisions)


def restore_state(state, preset: Preset, profile: np.ndarray, header: np.ndarray) -> None:
    """Set NeMo's async streaming state from a saved PROFILE / PROFILE_HEADER (contract layout)."""
    shapes = contract.profile_shapes(preset, int(state.spkcache.shape[2]))
    bounds = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]
    parts = np.split(np.asarray(profile, np.float32), bounds)
    sc, sp, fifo, mean = (torch.from_numpy(part.reshape(1, *shape).copy()) for part, shape in zip(parts, shapes))
    h = {name: int(v) for name, v in zip(contract.PROFILE_HEADER_FIELDS, np.asarray(header).reshape(-1))}
    state.spkcache, state.spkcache_preds, state.mean_sil_emb = sc, sp, mean
    state.fifo = fifo[:, :preset.fifo_len]  # NeMo's FIFO has fifo_len rows; the graph's at least 1
    state.spkcache_lengths = torch.tensor([h["spkcache_lengths"]], dtype=torch.long)
    state.fifo_lengths = torch.tensor([h["fifo_lengths"]], dtype=torch.long)
    state.n_sil_frames = torch.tensor([h["n_sil_frames"]], dtype=torch.long)


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
