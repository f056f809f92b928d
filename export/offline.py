"""The offline Sortformer (v1, ``nvidia/diar_sortformer_4spk-v1``) as one ONNX graph: padded audio -> predictions.

NeMo's ``SortformerEncLabelModel.forward`` with ``streaming_mode`` false, for a batch of recordings of different
lengths (each row zero-padded, its length given):

1. the waveform scaled by ``1 / (max + eps)``. NeMo takes the max over the *whole batch* (``audio_signal.max()``),
   so its result for a recording depends on what it is batched with; here the max is the row's own (its valid
   samples), i.e. NeMo's forward on that recording alone, whatever Triton's dynamic batcher puts next to it;
2. NeMo's log-mel (pre-emphasis, centred zero-padded STFT, power, mel, log(x + guard)) in float64, as the
   streaming feature graph computes it (``graphs.StreamingFeatures.log_mel``), frames ``length // 160``;
3. per-feature normalization over the row's valid frames (mean, unbiased std + 1e-5), padding set to 0;
4. NeMo's own FastConformer encoder (its subsampling masks padding, so padded rows equal unpadded ones),
   Transformer encoder and speaker head, traced as they are.

Outputs: PREDS [batch, frames, 4] (zero past the row's frames) and N_FRAMES [batch, 1]. The time axis is
variable; the positional encoding is sized for ``max_samples`` padded to its bucket (longer audio is refused by ``offline_admission``
before it reaches the graph).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sortformer_triton import contract, offline
from sortformer_triton.presets import HOP_SAMPLES, N_FFT, SUBSAMPLING

from .graphs import log_mel, register_log_mel
from .onnx_export import export_graph, weights_digest

NORMALIZE_CONSTANT = 1e-5  # NeMo's features.CONSTANT, added to the per-feature std


class OfflineDiarizer(nn.Module):
    """Padded 16 kHz audio [B, N] + lengths [B, 1] -> NeMo's offline predictions [B, T, 4] + frame counts."""

    def __init__(self, model, max_samples: int):
        super().__init__()
        feats = model.preprocessor.featurizer
        self.preemph = float(feats.preemph) if feats.preemph is not None else 0.0
        self.eps = float(model.eps)
        self.per_feature = model.cfg.preprocessor.get("normalize", None) == "per_feature"
        register_log_mel(self, feats)  # the streaming feature graph's STFT + mel, in float64
        self.encoder = model.encoder
        self.transformer = model.transformer_encoder
        self.mods = model.sortformer_modules
        # the relative positional encoding must cover the longest admitted recording (NeMo grows it lazily)
        # (and its padding: clients pad to the 5 s bucket, offline.padded_length)
        self.encoder.set_max_audio_length(offline.padded_length(max_samples) // HOP_SAMPLES + 2 * SUBSAMPLING)

    def features(self, audio: Tensor, length: Tensor) -> Tensor:
        """[B, N] audio, [B] lengths -> [B, mels, N // 160] NeMo features (normalized, zero past each row)."""
        b, n = audio.shape
        t = torch.arange(n, device=audio.device).unsqueeze(0)
        valid = t < length.unsqueeze(1)
        x = torch.where(valid, audio, torch.zeros_like(audio))
        peak = torch.where(valid, audio, torch.full_like(audio, -3.0e38)).amax(dim=1, keepdim=True)
        x = x * (1.0 / (peak + self.eps))  # NeMo's float32 scaling, with the row's own max
        xd = x.to(torch.float64)
        prev = torch.cat([torch.zeros_like(xd[:, :1]), xd[:, :-1]], dim=1)
        xs = torch.where(valid, xd - self.preemph * prev, torch.zeros_like(xd))
        half = N_FFT // 2
        padded = torch.cat([torch.zeros_like(xs[:, :half]), xs, torch.zeros_like(xs[:, :half])], dim=1)
        frames_total = torch.div(torch._shape_as_tensor(audio)[1], HOP_SAMPLES, rounding_mode="floor")
        idx = (torch.arange(frames_total, device=audio.device).unsqueeze(1) * HOP_SAMPLES
               + torch.arange(N_FFT, device=audio.device).unsqueeze(0))
        mel = log_mel(self, padded[:, idx])  # frames [B, T, 512] -> [B, T, mels] float32
        n_frames = torch.div(length, HOP_SAMPLES, rounding_mode="floor")
        fmask = (torch.arange(mel.shape[1], device=audio.device).unsqueeze(0) < n_frames.unsqueeze(1)).unsqueeze(2)
        if self.per_feature:
            count = n_frames.to(torch.float32).clamp(min=1.0).reshape(b, 1, 1)
            mean = torch.where(fmask, mel, torch.zeros_like(mel)).sum(dim=1, keepdim=True) / count
            dev = torch.where(fmask, mel - mean, torch.zeros_like(mel))
            std = torch.sqrt((dev * dev).sum(dim=1, keepdim=True) / (count - 1.0).clamp(min=1.0))
            mel = (mel - mean) / (std + NORMALIZE_CONSTANT)
        mel = torch.where(fmask, mel, torch.zeros_like(mel))
        return mel.transpose(1, 2), n_frames

    def forward(self, audio: Tensor, audio_length: Tensor):
        length = audio_length.reshape(-1).to(torch.int64).clamp(min=0).clamp(max=audio.shape[1])
        feats, n_frames = self.features(audio, length)
        emb, emb_len = self.encoder(audio_signal=feats, length=n_frames)
        emb = emb.transpose(1, 2)
        if self.mods.encoder_proj is not None:
            emb = self.mods.encoder_proj(emb)
        mask = (torch.arange(emb.shape[1], device=emb.device).unsqueeze(0) < emb_len.unsqueeze(1))
        hidden = self.transformer(encoder_states=emb, encoder_mask=mask.to(emb.dtype))
        preds = self.mods.forward_speaker_sigmoids(hidden) * mask.unsqueeze(-1).to(emb.dtype)
        return preds, emb_len.to(torch.int64).unsqueeze(1)


def export_offline(model, path: Path, source: str, max_samples: int) -> Path:
    """Write the offline graph (``onnx_export.export_graph``: IR 8 / opset 17, the contract's dims) with its
    metadata; traced on two recordings of different lengths."""
    module = OfflineDiarizer(model, max_samples).eval()
    example = {contract.AUDIO: torch.zeros(2, 3 * 16000),
               contract.AUDIO_LENGTH: torch.tensor([[3 * 16000], [2 * 16000]], dtype=torch.int64)}
    meta = {"graph": "sortformer_offline", "source": source, "max_samples": max_samples,
            "emb_dim": int(model.cfg.encoder.d_model), "weights": weights_digest(model)}
    return export_graph(module, offline.sortformer_io(), path, meta, example)


# ---- parity with NeMo (python -m export.parity --offline, tests/test_offline.py) ---------------------------
def nemo_forward(model, audio):
    """NeMo's offline forward on one recording alone (what its ``diarize()`` runs with batch_size=1)."""
    with torch.no_grad():
        preds = model.forward(audio_signal=torch.from_numpy(audio)[None], audio_signal_length=torch.tensor([audio.size]))
    return preds[0].numpy()


def nemo_feature_sensitivity(model, audio, seed: int = 0) -> float:
    """How far NeMo's own predictions move when its float32 features move by one ulp (a random sign per value):
    NeMo's float32 rounding, amplified by a steep (saturated) head near its decision boundaries. The graph
    computes the features in float64, so parity allows this much more than the tolerance, as the streaming
    parity does (export.parity.check_streams)."""
    import numpy as np

    with torch.no_grad():
        feats, length = model.process_signal(audio_signal=torch.from_numpy(audio)[None],
                                             audio_signal_length=torch.tensor([audio.size]))
        feats = feats[:, :, : int(length.max())]
        nudge = np.where(np.random.default_rng(seed).random(tuple(feats.shape)) < 0.5, -np.inf, np.inf)
        moved = torch.from_numpy(np.nextafter(feats.numpy(), nudge.astype(np.float32)))
        out = []
        for f in (feats, moved):
            emb, emb_len = model.frontend_encoder(processed_signal=f, processed_signal_length=length)
            out.append(model.forward_infer(emb, emb_len)[0].numpy())
    return float(np.abs(out[0] - out[1]).max())


def run_graph(path: Path, audios):
    """The offline graph in onnxruntime on ``audios`` as one batch, zero-padded to one bucket as a client pads:
    per recording (its predictions, frame count), and the raw [B, T, 4] / [B, 1] outputs."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = np.zeros((len(audios), offline.padded_length(max(a.size for a in audios))), np.float32)
    for i, a in enumerate(audios):
        batch[i, : a.size] = a
    lengths = np.array([[a.size] for a in audios], np.int64)
    preds, n_frames = session.run(None, {contract.AUDIO: batch, contract.AUDIO_LENGTH: lengths})
    return offline.split_batch(preds, n_frames), preds, n_frames


def parity_lines(source: str, seed: int, batches, tmp: Path, loaded=None, tolerance: float = 1e-4):
    """Per head (random init: calibrated and saturated; else the loaded weights) and batch size: the exported
    graph on a padded batch of recordings of different lengths vs NeMo's forward on each alone. A recording
    passes within ``tolerance`` plus NeMo's own movement under one ulp of its float32 features."""
    from sortformer_triton.samples import conversation

    from .models import RANDOM_SOURCES, random_model

    heads = {"calibrated": False, "saturated": True} if source in RANDOM_SOURCES else {"weights": None}
    for head, saturated in heads.items():
        model = loaded if saturated is None else random_model(source, seed=seed, saturated=saturated, offline=True)
        path = export_offline(model, tmp / f"offline_{head}.onnx", source, max_samples=60 * 16000)
        for batch in batches:
            audios = [conversation(11.0 - 2.3 * i, n_speakers=2 + i % 3, seed=seed + 10 * batch + i)[0]
                      for i in range(batch)]
            rows, _, _ = run_graph(path, audios)
            diffs = [float(abs(got - nemo_forward(model, a)).max()) for a, (got, _) in zip(audios, rows)]
            moved = [nemo_feature_sensitivity(model, a, seed=i) for i, a in enumerate(audios)]
            yield {"family": "offline", "model": source, "head": head, "batch": batch,
                   "seconds": [round(a.size / 16000, 2) for a in audios], "max_abs": max(diffs),
                   "nemo_feature_sensitivity": max(moved),
                   "pass": all(d <= tolerance + m for d, m in zip(diffs, moved))}
