"""The two stateful streaming graphs, as torch modules written for ONNX export.

Both are vectorized over the batch: every row is a different stream at its own age (starting, waiting
for right context, compressing its speaker cache, flushing its tail), so there are no Python loops over
rows and no data-dependent shapes: per-row lengths become index arithmetic, ``gather`` and ``where``.
State goes in as inputs and comes out as ``out_<name>`` outputs (see sortformer_triton.contract).

* :class:`StreamingFeatures` turns steps of 16 kHz audio into the model's own log-mel frames, equal to
  NeMo's preprocessor run on the whole file, and cuts the feature window of the next chunk once its
  right context exists (or the audio ended).
* :class:`StreamingStep` is NeMo's ``forward_streaming_step`` with ``async_streaming=True``: pre-encode
  the window, pack [speaker cache | FIFO | chunk], FastConformer + Transformer + speaker head, then the
  speaker-cache/FIFO update of ``SortformerModules.streaming_update_async`` including the compression
  (score boosts, top-k per speaker, silence frames) with NeMo's quirks.

Two places where "NeMo's arithmetic" needs a rule NeMo does not state (docs/parity.md):

* **Top-k ties.** A confident model gives many frames exactly equal compression scores; NeMo's
  ``torch.topk(..., sorted=False)`` orders equal values as its kernel happens to. These graphs take the ONNX
  TopK rule, equal values by lower index first (:func:`stable_topk`, the same in torch and onnxruntime);
  parity compares with NeMo under that rule (``export.reference.deterministic_topk``).
* **Rounding of the score logs.** Exported, the scores' logs are correctly rounded (:func:`score_log`), the
  closest float32 implementation of torch's log we can write in ONNX; where the two still differ, NeMo's
  top-k can decide differently (``export.reference`` records such steps as ``log_rounding``).
* **Saturated sigmoids.** onnxruntime's ``Sigmoid`` kernel rounds differently from ``torch.sigmoid`` near
  0 and 1 (about 1 % of the logits above 5 give 1 - 2**-24 instead of 1.0), which breaks exact ties NeMo
  has; ``1 / (1 + exp(-x))`` gives exactly 1.0 on the same logits as torch (:func:`speaker_sigmoid`).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from sortformer_triton.contract import (
    AUDIO_TAIL_SAMPLES,
    ERR_AFTER_END,
    ERR_AMPLITUDE,
    ERR_LENGTH_NEGATIVE,
    ERR_LENGTH_OVER_STEP,
    ERR_CHUNK_INDEX,
    ERR_FEATURE_LENGTH,
    ERR_FEATURES_NOT_FINITE,
    ERR_FEATURES_RANGE,
    ERR_LEFT_CONTEXT,
    ERR_NOT_FINITE,
    MAX_ABS_AMPLITUDE,
    MAX_ABS_FEATURE,
    MAX_CHUNK_INDEX,
    MAX_ABS_PROFILE,
    ERR_PROFILE_FLAGS,
    ERR_PROFILE_ORIGIN,
    ERR_PROFILE_SIZE,
    ERR_PROFILE_STATE,
    PROFILE_FORMAT,
    PROFILE_HEADER_LEN,
    PROFILE_RESTORE,
    PROFILE_SAVE,
    profile_shapes,
    profile_size,
)
from sortformer_triton.presets import HOP_SAMPLES, N_FFT, N_SPEAKERS, SUBSAMPLING, WIN_SAMPLES, Preset

NEG_INF = float("-inf")


def _arange(n: int, like: Tensor) -> Tensor:
    return torch.arange(n, device=like.device, dtype=torch.int64)


def _gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """out[b, i, :] = src[b, index[b, i], :] (index already clipped into range)."""
    return torch.gather(src, 1, index.unsqueeze(-1).expand(-1, -1, src.shape[2]))


def _concat_valid(parts: Sequence[Tuple[Tensor, Tensor]], out_len: int) -> Tensor:
    """Per row, the first length_i rows of each part, back to back, zero-padded to out_len rows
    (NeMo's ``concat_and_pad`` and its FIFO/cache appends, without a loop over the batch)."""
    first = parts[0][0]
    b = first.shape[0]
    cat = torch.cat([t for t, _ in parts] + [torch.zeros(b, 1, first.shape[2], dtype=first.dtype, device=first.device)], dim=1)
    pos = _arange(out_len, first).unsqueeze(0)
    src = torch.full_like(pos.expand(b, -1), cat.shape[1] - 1)  # the zero row
    start = torch.zeros_like(parts[0][1]).unsqueeze(1)
    offset = 0
    for tensor, length in parts:
        end = start + length.unsqueeze(1)
        src = torch.where((pos >= start) & (pos < end), offset + pos - start, src)
        start, offset = end, offset + tensor.shape[1]
    return _gather_rows(cat, src)


def stable_topk(x: Tensor, k: int, dim: int = 1) -> Tuple[Tensor, Tensor]:
    """The k largest values along ``dim`` and their indices, equal values by lower index first.

    Exported, this is ONNX TopK, whose specification breaks ties by lower index; run in torch it is a stable
    descending sort cut to k (torch's own ``topk`` leaves the order of ties to its kernel).
    """
    if torch.onnx.is_in_onnx_export():
        return torch.topk(x, k, dim=dim, largest=True, sorted=True)
    values, idx = torch.sort(x, dim=dim, descending=True, stable=True)
    return values.narrow(dim, 0, k), idx.narrow(dim, 0, k)


def speaker_sigmoid(logits: Tensor) -> Tensor:
    """torch.sigmoid, written so that onnxruntime saturates to exactly 0/1 on the logits torch does."""
    return 1.0 / (1.0 + torch.exp(-logits))


def score_log(x: Tensor) -> Tensor:
    """The log of the compression scores. Exported: computed in float64 and rounded to float32, i.e. correctly
    rounded; onnxruntime's float32 Log is an ulp off torch's on 1-3 % of these inputs, which unties scores
    NeMo finds equal. torch's own float32 log (run in torch: NeMo's exactly) is correctly rounded on ~99.9 %
    of them; docs/parity.md has the measurement."""
    if torch.onnx.is_in_onnx_export():
        return torch.log(x.to(torch.float64)).to(x.dtype)
    return torch.log(x)


def _reset(start: Tensor, *states: Tensor) -> Tuple[Tensor, ...]:
    """Zero every state of the rows whose request carries START."""
    out = []
    for s in states:
        shape = [-1] + [1] * (s.dim() - 1)
        out.append(torch.where(start.reshape(shape) != 0, torch.zeros_like(s), s))
    return tuple(out)


def register_log_mel(module: nn.Module, featurizer) -> None:
    """NeMo's STFT window and mel filterbank as buffers of ``module`` (``dft_cos``, ``dft_sin``, ``mel_fb``) and
    its log guard (``module.guard``), for :func:`log_mel`: the window is folded into the DFT basis, frames @
    (window * cos) / (window * sin), in float64 (a float32 matmul DFT loses low-energy bands to rounding, 1e-4
    in log-mel; FFT does not)."""
    module.guard = float(featurizer.log_zero_guard_value_fn(torch.zeros(1)))
    win = featurizer.window.detach().float()
    pad = (N_FFT - win.numel()) // 2
    window = torch.zeros(N_FFT)
    window[pad : pad + win.numel()] = win
    n = torch.arange(N_FFT, dtype=torch.float64)
    k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)
    ang = 2 * math.pi * torch.outer(n, k) / N_FFT
    module.register_buffer("dft_cos", window.double().unsqueeze(1) * torch.cos(ang))
    module.register_buffer("dft_sin", window.double().unsqueeze(1) * -torch.sin(ang))
    module.register_buffer("mel_fb", featurizer.fb.detach()[0].double().t().contiguous())  # [257, mels]


def log_mel(module: nn.Module, frames: Tensor) -> Tensor:
    """[B, n, 512] pre-emphasized float64 frames -> [B, n, mels] log-mel (float32 out), with the buffers of
    :func:`register_log_mel`. Computed in float64 end to end: the result equals NeMo's pipeline evaluated
    exactly; NeMo's own float32 torch.stft is ~2e-4 off that in near-silent bands."""
    re = torch.matmul(frames, module.dft_cos)
    im = torch.matmul(frames, module.dft_sin)
    power = re * re + im * im
    return torch.log(torch.matmul(power, module.mel_fb) + module.guard).to(torch.float32)


class StreamingFeatures(nn.Module):
    """Audio steps -> NeMo log-mel frames -> the next chunk's feature window.

    Frame i of NeMo's (center, zero-padded) STFT sees pre-emphasized samples [160 i - 200, 160 i + 200).
    It is final once those samples arrived; at the end of the audio (the first request with fewer than
    ``step_samples`` valid samples) the remaining frames use zeros, exactly like NeMo's whole-file
    padding, and NeMo's count of frames (samples // 160) is honoured.
    """

    def __init__(self, featurizer, preset: Preset):
        super().__init__()
        self.p = preset
        self.preemph = float(featurizer.preemph)
        register_log_mel(self, featurizer)
        self.step = preset.step_samples
        self.nf = preset.new_mel_frames_max
        self.buf = preset.feature_buffer_frames
        self.window_frames = preset.window_mel_frames
        self.chunk_mel = preset.chunk_mel_frames
        self.left_mel = preset.left_context * SUBSAMPLING
        self.right_mel = preset.right_context * SUBSAMPLING

    def log_mel(self, frames: Tensor) -> Tensor:
        return log_mel(self, frames)

    def forward(self, audio, audio_length, start, audio_tail, feat_buffer, counters):
        audio_tail, feat_buffer, counters = _reset(start, audio_tail, feat_buffer, counters)
        b = audio.shape[0]
        seen, done_frames, chunk_idx, ended = counters[:, 0], counters[:, 1], counters[:, 2], counters[:, 3]

        error = self.input_error(audio, audio_length, ended)
        bad = error != 0
        # a refused request changes nothing: no samples, no end of audio, no chunk, every state passed on
        valid = audio_length.reshape(b).to(torch.int64).clamp(0, self.step)
        valid = torch.where(bad | (ended != 0), torch.zeros_like(valid), valid)
        new_ended = torch.where((ended != 0) | ((valid < self.step) & ~bad), torch.ones_like(ended), torch.zeros_like(ended))
        t = _arange(self.step, audio).unsqueeze(0)
        x = torch.where(t < valid.unsqueeze(1), audio, torch.zeros_like(audio))

        # raw samples [tail: global samples seen-TAIL .. seen | this step | zeros for the end padding],
        # pre-emphasized in float64 (NeMo: y[0] = x[0], y[t] = x[t] - 0.97 x[t-1], zero past the end;
        # the tail's first sample never reaches a frame, so its missing predecessor does not matter)
        pad = torch.zeros(b, N_FFT // 2, dtype=audio.dtype, device=audio.device)
        raw = torch.cat([audio_tail, x, pad], dim=1)
        xd = raw.to(torch.float64)
        prev = torch.cat([torch.zeros_like(xd[:, :1]), xd[:, :-1]], dim=1)
        pos = _arange(raw.shape[1], audio).unsqueeze(0)
        xs = torch.where(pos < (AUDIO_TAIL_SAMPLES + valid).unsqueeze(1), xd - self.preemph * prev, torch.zeros_like(xd))
        total = seen + valid
        exact = torch.div(total - WIN_SAMPLES // 2, HOP_SAMPLES, rounding_mode="floor") + 1
        exact = torch.where(total >= WIN_SAMPLES // 2, exact, torch.zeros_like(exact))
        final_count = torch.div(total, HOP_SAMPLES, rounding_mode="floor")
        new_done = torch.where(new_ended != 0, final_count, torch.maximum(exact, done_frames))
        n_new = (new_done - done_frames).clamp(0, self.nf)
        new_done = done_frames + n_new

        # frames done_frames + q, q < nf: window start sample (i*160 - 256) in buffer coordinates
        q = _arange(self.nf, audio).unsqueeze(0)
        first = (done_frames.unsqueeze(1) + q) * HOP_SAMPLES - N_FFT // 2 - (seen.unsqueeze(1) - AUDIO_TAIL_SAMPLES)
        idx = first.unsqueeze(2) + _arange(N_FFT, audio).reshape(1, 1, -1)
        idx = idx.clamp(0, xs.shape[1] - 1).reshape(b, -1)
        frames = torch.gather(xs, 1, idx).reshape(b, self.nf, N_FFT)
        mel = self.log_mel(frames)  # [B, nf, 128]

        # feature buffer holds frames [b0, b0 + buf), b0 = max(0, first frame of the next chunk's window)
        b0 = (chunk_idx * self.chunk_mel - self.left_mel).clamp(min=0)
        j = _arange(self.buf, audio).unsqueeze(0)
        glob = b0.unsqueeze(1) + j
        rel = glob - done_frames.unsqueeze(1)
        from_new = (rel >= 0) & (rel < n_new.unsqueeze(1))
        new_rows = _gather_rows(mel, rel.clamp(0, self.nf - 1))
        keep_old = (rel < 0).unsqueeze(2)
        buf = torch.where(keep_old, feat_buffer, torch.where(from_new.unsqueeze(2), new_rows, torch.zeros_like(new_rows)))

        # is chunk `chunk_idx` ready? full right context, or the audio ended with frames left
        chunk_end = (chunk_idx + 1) * self.chunk_mel
        full = new_done >= chunk_end + self.right_mel
        tail = (new_ended != 0) & (chunk_idx * self.chunk_mel < new_done)
        ready = (full | tail) & ~bad
        win_end = torch.minimum(chunk_end + self.right_mel, new_done)
        feat_len = torch.where(ready, win_end - b0, torch.zeros_like(b0)).clamp(0, self.window_frames)
        w = _arange(self.window_frames, audio).unsqueeze(0)
        window = torch.where((w < feat_len.unsqueeze(1)).unsqueeze(2), buf[:, : self.window_frames], torch.zeros_like(buf[:, : self.window_frames]))
        left = torch.div(torch.minimum(chunk_idx * self.chunk_mel, torch.full_like(chunk_idx, self.left_mel)), SUBSAMPLING, rounding_mode="floor")
        new_chunk = chunk_idx + ready.to(torch.int64)
        finished = (new_ended != 0) & (new_chunk * self.chunk_mel >= new_done)

        # slide the buffer to the next window's first frame
        b1 = (new_chunk * self.chunk_mel - self.left_mel).clamp(min=0)
        src = j + (b1 - b0).unsqueeze(1)
        shifted = _gather_rows(buf, src.clamp(0, self.buf - 1))
        out_buf = torch.where((src < self.buf).unsqueeze(2), shifted, torch.zeros_like(shifted))

        tail_idx = valid.unsqueeze(1) + _arange(AUDIO_TAIL_SAMPLES, audio).unsqueeze(0)
        out_tail = torch.gather(raw, 1, tail_idx)
        out_counters = torch.stack([total, new_done, new_chunk, new_ended], dim=1)
        keep = bad.unsqueeze(1)
        return (
            window,
            feat_len.unsqueeze(1),
            torch.where(ready, left, torch.zeros_like(left)).unsqueeze(1),
            chunk_idx.unsqueeze(1),
            finished.to(torch.int32).unsqueeze(1),
            error.to(torch.int32).unsqueeze(1),
            torch.where(keep, audio_tail, out_tail),
            torch.where(keep.unsqueeze(2), feat_buffer, out_buf),
            torch.where(keep, counters, out_counters),
        )

    def input_error(self, audio: Tensor, audio_length: Tensor, ended: Tensor) -> Tensor:
        """[B] int64 bit mask of what is wrong with each request (contract.ERR_*; 0 = valid)."""
        b = audio.shape[0]
        length = audio_length.reshape(b).to(torch.int64)
        finite = ~(torch.isnan(audio) | torch.isinf(audio))
        zero = torch.zeros_like(length)

        def flag(condition: Tensor, bit: int) -> Tensor:
            return torch.where(condition, torch.full_like(length, bit), zero)

        return (
            flag(length < 0, ERR_LENGTH_NEGATIVE)
            + flag(length > self.step, ERR_LENGTH_OVER_STEP)
            + flag(~finite.all(dim=1), ERR_NOT_FINITE)
            + flag((finite & (audio.abs() > MAX_ABS_AMPLITUDE)).any(dim=1), ERR_AMPLITUDE)
            + flag((ended != 0) & (length > 0), ERR_AFTER_END)
        )


class StreamingStep(nn.Module):
    """One streaming step of Sortformer with the speaker cache / FIFO update inside the graph."""

    def __init__(self, model, preset: Preset, fingerprint: int = 0):
        super().__init__()
        self.model = model
        self.fingerprint = int(fingerprint)  # of the weights and the preset: a profile of another is refused
        m = model.sortformer_modules
        self.p = preset
        self.S = preset.spkcache_len
        self.F = max(preset.fifo_len, 1)
        self.fifo_len = preset.fifo_len
        self.C = preset.chunk_len
        self.R = max(preset.right_context, 1)
        self.E = preset.left_context + preset.chunk_len + preset.right_context  # pre-encoded window frames
        self.P = preset.pop_out_max
        self.period = preset.spkcache_update_period
        self.D = int(model.cfg.encoder.d_model)
        self.sil_threshold = float(m.sil_threshold)
        self.sil_per_spk = int(m.spkcache_sil_frames_per_spk)
        self.pred_score_threshold = float(m.pred_score_threshold)
        self.scores_boost_latest = float(m.scores_boost_latest)
        self.max_index = int(m.max_index)
        per_spk = self.S // N_SPEAKERS - self.sil_per_spk
        self.strong = math.floor(per_spk * m.strong_boost_rate)
        self.weak = math.floor(per_spk * m.weak_boost_rate)
        self.min_pos = math.floor(per_spk * m.min_pos_scores_rate)
        self.profile_size = profile_size(preset, self.D)

    # ---- the neural part, exactly NeMo's modules ------------------------------------------------
    def predict(self, packed: Tensor, lengths: Tensor) -> Tensor:
        """NeMo's ``forward_infer`` + ``apply_mask_to_preds``, the head's sigmoid as :func:`speaker_sigmoid`."""
        model, m = self.model, self.model.sortformer_modules
        emb, emb_len = model.frontend_encoder(processed_signal=packed, processed_signal_length=lengths, bypass_pre_encode=True)
        mask = m.length_to_mask(emb_len, emb.shape[1])
        hidden = model.transformer_encoder(encoder_states=emb, encoder_mask=mask)
        hidden = m.first_hidden_to_hidden(torch.relu(hidden))  # dropout: identity in eval
        preds = speaker_sigmoid(m.single_hidden_to_spks(torch.relu(hidden))) * mask.unsqueeze(-1)
        return m.apply_mask_to_preds(preds, emb_len)

    # ---- NeMo's _compress_spkcache, fixed shapes ------------------------------------------------
    def _boost_topk(self, scores: Tensor, k: int, scale: float) -> Tensor:
        _, idx = stable_topk(scores, k, dim=1)
        mask = torch.zeros_like(scores).scatter(1, idx, 1.0)
        return scores - mask * (scale * math.log(0.5))

    def compress(self, emb: Tensor, preds: Tensor, mean_sil: Tensor) -> Tuple[Tensor, Tensor]:
        b, n, _ = preds.shape
        thr = self.pred_score_threshold
        log_p = score_log(preds.clamp(min=thr))
        log_1p = score_log((1.0 - preds).clamp(min=thr))
        scores = log_p - log_1p + log_1p.sum(dim=2, keepdim=True) - math.log(0.5)
        is_speech = preds > 0.5
        scores = torch.where(is_speech, scores, torch.full_like(scores, NEG_INF))
        is_pos = scores > 0
        enough = is_pos.sum(dim=1, keepdim=True) >= self.min_pos
        scores = torch.where((~is_pos) & is_speech & enough, torch.full_like(scores, NEG_INF), scores)
        if self.scores_boost_latest > 0:  # NeMo boosts by position: rows at index >= spkcache_len
            latest = (_arange(n, preds) >= self.S).to(scores.dtype).reshape(1, n, 1)
            scores = scores + latest * self.scores_boost_latest
        scores = self._boost_topk(scores, self.strong, 2.0)
        scores = self._boost_topk(scores, self.weak, 1.0)
        if self.sil_per_spk > 0:
            pad = torch.full((b, self.sil_per_spk, N_SPEAKERS), float("inf"), dtype=scores.dtype, device=scores.device)
            scores = torch.cat([scores, pad], dim=1)
        n_all = scores.shape[1]
        flat = scores.permute(0, 2, 1).reshape(b, -1)
        values, idx = stable_topk(flat, self.S, dim=1)
        idx = torch.where(values != NEG_INF, idx, torch.full_like(idx, self.max_index))
        idx, _ = torch.sort(idx, dim=1)
        disabled = idx == self.max_index
        idx = torch.remainder(idx, n_all)
        disabled = disabled | (idx >= n_all - self.sil_per_spk)
        idx = torch.where(disabled, torch.zeros_like(idx), idx)
        gathered = _gather_rows(emb, idx)
        gathered = torch.where(disabled.unsqueeze(2), mean_sil.unsqueeze(1).expand(-1, self.S, -1), gathered)
        gathered_preds = torch.where(disabled.unsqueeze(2), torch.zeros(1, dtype=preds.dtype), _gather_rows(preds, idx))
        return gathered, gathered_preds

    # ---- speaker profiles: the state restored on START, the state saved after a request -------------
    def _unpack_profile(self, profile: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """PROFILE [B, n] as (spkcache, spkcache_preds, fifo, mean_sil_emb); a row of the wrong size is cut
        or zero-padded to shape (and refused by :meth:`profile_error`)."""
        b, n = profile.shape[0], self.profile_size
        flat = torch.cat([profile, torch.zeros(b, n, dtype=profile.dtype, device=profile.device)], dim=1)[:, :n]
        shapes = profile_shapes(self.p, self.D)
        parts = torch.split(flat, [math.prod(shape) for shape in shapes], dim=1)
        sc, sp, fifo, mean = (part.reshape(b, *shape) for part, shape in zip(parts, shapes))
        return sc, sp, fifo, mean

    def _fingerprint(self) -> Tensor:
        # an int64 tensor constant: a Python int would be traced as a float scalar and lose its low bits
        return torch.tensor(self.fingerprint, dtype=torch.int64)

    def profile_error(self, profile: Tensor, preds: Tensor, header: Tensor,
                      start: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """([B] bit mask of what is wrong with each row's profile inputs, restore [B] bool, save [B] bool);
        ``preds`` are the profile's speaker-cache predictions (:meth:`_unpack_profile`)."""
        b = header.shape[0]
        h = header.reshape(b, PROFILE_HEADER_LEN)
        flags, version, fingerprint = h[:, 0], h[:, 1], h[:, 2]
        sl, fl, n_sil = h[:, 3], h[:, 4], h[:, 5]
        # flags as arithmetic: ONNX has no integer bit operators before opset 18
        restore = torch.remainder(flags, 2) == PROFILE_RESTORE
        save = torch.remainder(torch.div(flags, 2, rounding_mode="floor"), 2) == 1
        zero = torch.zeros_like(flags)

        def flag(condition: Tensor, bit: int) -> Tensor:
            return torch.where(condition, torch.full_like(zero, bit), zero)

        size = torch.ones_like(profile).sum(dim=1).to(torch.int64)  # the row length, as data (traced)
        finite = ~(torch.isnan(profile) | torch.isinf(profile))
        within = torch.where(finite, profile.abs(), torch.zeros_like(profile)) <= MAX_ABS_PROFILE
        values_ok = finite.all(dim=1) & within.all(dim=1)
        preds_ok = ((preds >= 0) & (preds <= 1)).reshape(b, -1).all(dim=1)
        lengths_ok = (sl >= 0) & (sl <= self.S) & (fl >= 0) & (fl <= self.fifo_len) & (n_sil >= 0)
        error = (
            flag((flags < 0) | (flags > PROFILE_RESTORE + PROFILE_SAVE) | (restore & (start.reshape(b) == 0)),
                 ERR_PROFILE_FLAGS)
            + flag(restore & (size != self.profile_size), ERR_PROFILE_SIZE)
            + flag(restore & ((version != PROFILE_FORMAT) | (fingerprint != self._fingerprint())), ERR_PROFILE_ORIGIN)
            + flag(restore & (size == self.profile_size) & ~(values_ok & preds_ok & lengths_ok), ERR_PROFILE_STATE)
        )
        return error, restore & (error == 0), save & (flags >= 0) & (flags <= PROFILE_RESTORE + PROFILE_SAVE)

    def _restore(self, restore: Tensor, unpacked: Sequence[Tensor], header: Tensor,
                 states: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """The states, with the unpacked profile and the header's lengths on the rows that restore."""
        h = header.reshape(header.shape[0], PROFILE_HEADER_LEN)
        sc, sp, fifo, mean = unpacked
        restored = (sc, sp, h[:, 3:4], fifo, h[:, 4:5], mean, h[:, 5:6])
        out = []
        for new, old in zip(restored, states):
            shape = [-1] + [1] * (old.dim() - 1)
            out.append(torch.where(restore.reshape(shape), new.to(old.dtype), old))
        return tuple(out)

    def _saved(self, save: Tensor, states: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """SAVED_PROFILE ([B, profile_size] when a row of the batch saves, else [B, 1]) and its header."""
        b = save.shape[0]
        sc, sp, sl, fifo, fl, mean, n_sil = states
        flat = torch.cat([sc.reshape(b, -1), sp.reshape(b, -1), fifo.reshape(b, -1), mean], dim=1)
        n = torch.where(save.any(), torch.tensor(self.profile_size), torch.tensor(1))
        flat = torch.index_select(flat, 1, torch.arange(n))  # one column unless a row saves
        flat = torch.where(save.unsqueeze(1), flat, torch.zeros_like(flat))
        zero = torch.zeros_like(sl.reshape(b))
        header = torch.stack([
            torch.full_like(zero, PROFILE_SAVE), torch.full_like(zero, PROFILE_FORMAT),
            zero + self._fingerprint(), sl.reshape(b), fl.reshape(b), n_sil.reshape(b)], dim=1)
        return flat, torch.where(save.unsqueeze(1), header, torch.zeros_like(header))

    def forward(self, features, feature_length, left_context, chunk_index, profile, profile_header, start,
                spkcache, spkcache_preds, spkcache_lengths, fifo, fifo_lengths, mean_sil_emb, n_sil_frames):
        spkcache, spkcache_preds, spkcache_lengths, fifo, fifo_lengths, mean_sil_emb, n_sil_frames = _reset(
            start, spkcache, spkcache_preds, spkcache_lengths, fifo, fifo_lengths, mean_sil_emb, n_sil_frames
        )
        unpacked = self._unpack_profile(profile)
        profile_err, restore, save = self.profile_error(profile, unpacked[1], profile_header, start)
        spkcache, spkcache_preds, spkcache_lengths, fifo, fifo_lengths, mean_sil_emb, n_sil_frames = self._restore(
            restore, unpacked, profile_header,
            (spkcache, spkcache_preds, spkcache_lengths, fifo, fifo_lengths, mean_sil_emb, n_sil_frames))
        b = features.shape[0]
        S, F, C, E, P = self.S, self.F, self.C, self.E, self.P
        # a refused request (FEATURE_ERROR != 0; only a direct caller can send one) is an idle row: no
        # features, so every state passes through unchanged and the outputs are zeros
        error = self.input_error(features, feature_length, left_context, chunk_index) + profile_err
        bad = error != 0
        feat_len = feature_length.reshape(b).clamp(0, features.shape[1])
        feat_len = torch.where(bad, torch.zeros_like(feat_len), feat_len)
        active = feat_len > 0
        lc = torch.where(bad, torch.zeros_like(feat_len), left_context.reshape(b))
        chunk_index = torch.where(bad.reshape(-1, 1), torch.zeros_like(chunk_index), chunk_index)
        sl = spkcache_lengths.reshape(b)
        fl = fifo_lengths.reshape(b)
        n_sil = n_sil_frames.reshape(b)

        t = _arange(features.shape[1], features).unsqueeze(0)
        feats = torch.where((t < feat_len.unsqueeze(1)).unsqueeze(2), features, torch.zeros_like(features))
        emb, emb_len = self.model.encoder.pre_encode(x=feats, lengths=feat_len)
        emb_len = emb_len.to(torch.int64)
        c = torch.minimum((emb_len - lc).clamp(min=0), torch.full_like(emb_len, C))
        rc = (emb_len - lc - c).clamp(min=0)
        c = torch.where(active, c, torch.zeros_like(c))  # an idle row confirms nothing and outputs zeros
        rc = torch.where(active, rc, torch.zeros_like(rc))

        # pack [spkcache[:sl] | fifo[:fl] | emb[:emb_len] | zeros]
        L = S + F + E
        total = sl + fl + emb_len
        packed = _concat_valid([(spkcache, sl), (fifo, fl), (emb, emb_len)], L)
        preds = self.predict(packed, total)  # [B, L, 4]

        def take(start_pos: Tensor, count: Tensor, n: int, source: Tensor) -> Tensor:
            i = _arange(n, source).unsqueeze(0)
            rows = _gather_rows(source, (start_pos.unsqueeze(1) + i).clamp(0, source.shape[1] - 1))
            return torch.where((i < count.unsqueeze(1)).unsqueeze(2), rows, torch.zeros_like(rows))

        fifo_preds = take(sl, fl, F, preds)
        chunk_preds = take(sl + fl + lc, c, C, preds)
        tentative = take(sl + fl + lc + c, rc, self.R, preds)
        chunk_embs = take(lc, c, C, emb)

        # FIFO += chunk; pop the oldest frames to the speaker cache when it overflows
        upd_fifo = _concat_valid([(fifo, fl), (chunk_embs, c)], F + C)
        upd_fifo_preds = _concat_valid([(fifo_preds, fl), (chunk_preds, c)], F + C)
        overflow = fl + c > self.fifo_len
        pop = torch.maximum(torch.full_like(c, self.period), c - self.fifo_len + fl)
        pop = torch.minimum(pop, fl + c)
        pop = torch.where(overflow, pop, torch.zeros_like(pop))
        new_fl = fl + c - pop
        new_fifo = take(pop, new_fl, F, upd_fifo)

        # silence profile from the popped frames
        pop_embs = take(torch.zeros_like(pop), pop, P, upd_fifo)
        pop_preds = take(torch.zeros_like(pop), pop, P, upd_fifo_preds)
        k = _arange(P, emb).unsqueeze(0)
        is_sil = (pop_preds.sum(dim=2) < self.sil_threshold) & (k < pop.unsqueeze(1))
        sil_count = is_sil.sum(dim=1).to(torch.int64)
        sil_sum = (pop_embs * is_sil.unsqueeze(2).to(pop_embs.dtype)).sum(dim=1)
        upd_n_sil = n_sil + sil_count
        upd_mean = (mean_sil_emb * n_sil.unsqueeze(1).to(mean_sil_emb.dtype) + sil_sum) / upd_n_sil.clamp(min=1).unsqueeze(1).to(mean_sil_emb.dtype)
        has_sil = (sil_count > 0).unsqueeze(1)
        new_mean = torch.where(has_sil, upd_mean, mean_sil_emb)
        new_n_sil = torch.where(sil_count > 0, upd_n_sil, n_sil)

        # speaker cache += popped frames (their predictions as popped: NeMo's async path always does this)
        upd_sc = _concat_valid([(spkcache, sl), (pop_embs, pop)], S + P)
        upd_sp = _concat_valid([(spkcache_preds, sl), (pop_preds, pop)], S + P)
        need = (sl + pop > S).reshape(b, 1, 1)
        comp_sc, comp_sp = self.compress(upd_sc, upd_sp, new_mean)
        new_sc = torch.where(need, comp_sc, upd_sc[:, :S])
        new_sp = torch.where(need, comp_sp, upd_sp[:, :S])
        new_sl = torch.minimum(sl + pop, torch.full_like(sl, S))

        a2, a3 = active.reshape(b, 1), active.reshape(b, 1, 1)
        states = (
            torch.where(a3, new_sc, spkcache),
            torch.where(a3, new_sp, spkcache_preds),
            torch.where(active, new_sl, sl).unsqueeze(1),
            torch.where(a3, new_fifo, fifo),
            torch.where(active, new_fl, fl).unsqueeze(1),
            torch.where(a2, new_mean, mean_sil_emb),
            torch.where(active, new_n_sil, n_sil).unsqueeze(1),
        )
        saved, saved_header = self._saved(save & ~bad, states)
        return (
            chunk_preds,
            c.to(torch.int32).unsqueeze(1),
            tentative,
            rc.to(torch.int32).unsqueeze(1),
            (chunk_index.reshape(b) * C).unsqueeze(1),
            error.to(torch.int32).unsqueeze(1),
            saved,
            saved_header,
        ) + states

    def input_error(self, features: Tensor, feature_length: Tensor, left_context: Tensor,
                    chunk_index: Tensor) -> Tensor:
        """[B] int64 bit mask of what is wrong with each row's inputs (contract.ERR_*; 0 = valid): the
        preprocessor never sends these, a client calling this model directly may (NaN features would
        otherwise flow into the sequence's speaker cache and FIFO)."""
        b = features.shape[0]
        length, left, index = feature_length.reshape(b), left_context.reshape(b), chunk_index.reshape(b)
        zero = torch.zeros_like(length)

        def flag(condition: Tensor, bit: int) -> Tensor:
            return torch.where(condition, torch.full_like(zero, bit), zero)

        finite = ~(torch.isnan(features) | torch.isinf(features))
        return (
            flag(~finite.reshape(b, -1).all(dim=1), ERR_FEATURES_NOT_FINITE)
            + flag((finite & (features.abs() > MAX_ABS_FEATURE)).reshape(b, -1).any(dim=1), ERR_FEATURES_RANGE)
            + flag((length < 0) | (length > features.shape[1]), ERR_FEATURE_LENGTH)
            + flag((left < 0) | (left > self.p.left_context), ERR_LEFT_CONTEXT)
            + flag((index < 0) | (index > MAX_CHUNK_INDEX), ERR_CHUNK_INDEX)
        )
