"""Load a Streaming Sortformer from a Hugging Face id, a local ``.nemo`` file, or random init.

Random init builds the real v2/v2.1 architecture (``full``, ~117M parameters) or a ``tiny`` variant of
the same code for tests. Features must be causal: released streaming checkpoints use un-normalized
log-mel; a model that normalizes per utterance cannot be streamed and is refused.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

DEFAULT_HF_ID = "nvidia/diar_streaming_sortformer_4spk-v2.1"
RANDOM_SOURCES = ("full", "tiny")

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A model source that cannot be loaded or cannot be streamed."""


def _arch(fc_d_model: int, tf_d_model: int, n_layers: int, n_heads: int, conv_channels: int,
          tf_layers: int, tf_inner: int, tf_heads: int) -> Dict[str, Any]:
    """The streaming Sortformer architecture (NeMo's streaming_sortformer_diarizer_4spk-v2 values),
    without training data/optimizer sections, with the released checkpoints' causal features."""
    return {
        "sample_rate": 16000,
        "pil_weight": 0.5,
        "ats_weight": 0.5,
        "max_num_of_spks": 4,
        "streaming_mode": True,
        "model_defaults": {"fc_d_model": fc_d_model, "tf_d_model": tf_d_model},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            # Released streaming checkpoints: no per-utterance normalization (it needs the whole file).
            "normalize": "NA",
            "window_size": 0.025,
            "sample_rate": 16000,
            "window_stride": 0.01,
            "window": "hann",
            "features": 128,
            "n_fft": 512,
            "frame_splicing": 1,
            "dither": 0.00001,  # applied only in training mode; exports and parity run in eval
        },
        "sortformer_modules": {
            "_target_": "nemo.collections.asr.modules.sortformer_modules.SortformerModules",
            "num_spks": 4,
            "dropout_rate": 0.5,
            "fc_d_model": fc_d_model,
            "tf_d_model": tf_d_model,
            "spkcache_len": 188,
            "fifo_len": 188,
            "chunk_len": 6,
            "spkcache_update_period": 144,
            "chunk_left_context": 1,
            "chunk_right_context": 7,
            "spkcache_sil_frames_per_spk": 3,
            "scores_add_rnd": 0,
            "pred_score_threshold": 0.25,
            "max_index": 99999,
            "scores_boost_latest": 0.05,
            "sil_threshold": 0.2,
            "strong_boost_rate": 0.75,
            "weak_boost_rate": 1.5,
            "min_pos_scores_rate": 0.5,
            "causal_attn_rate": 0.5,
            "causal_attn_rc": 7,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 128,
            "feat_out": -1,
            "n_layers": n_layers,
            "d_model": fc_d_model,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": conv_channels,
            "causal_downsampling": False,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": n_heads,
            "att_context_size": [-1, -1],
            "att_context_style": "regular",
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "batch_norm",
            "conv_context_size": None,
            "dropout": 0.1,
            "dropout_pre_encoder": 0.1,
            "dropout_emb": 0.0,
            "dropout_att": 0.1,
            "stochastic_depth_drop_prob": 0.0,
            "stochastic_depth_mode": "linear",
            "stochastic_depth_start_layer": 1,
        },
        "transformer_encoder": {
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": tf_layers,
            "hidden_size": tf_d_model,
            "inner_size": tf_inner,
            "num_attention_heads": tf_heads,
            "attn_score_dropout": 0.5,
            "attn_layer_dropout": 0.5,
            "ffn_dropout": 0.5,
            "hidden_act": "relu",
            "pre_ln": False,
            "pre_ln_final_layer_norm": True,
        },
        "loss": {"_target_": "nemo.collections.asr.losses.bce_loss.BCELoss", "weight": None, "reduction": "mean"},
    }


ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    # The released v2 / v2.1 size: 17 FastConformer layers (512), 18 Transformer layers (192).
    "full": _arch(512, 192, n_layers=17, n_heads=8, conv_channels=256, tf_layers=18, tf_inner=768, tf_heads=8),
    # Same code, small sizes: for tests and CI.
    "tiny": _arch(64, 32, n_layers=2, n_heads=4, conv_channels=16, tf_layers=2, tf_inner=64, tf_heads=4),
}


# The offline Sortformer v1 (nvidia/diar_sortformer_4spk-v1): NeMo's sortformer_diarizer_hybrid_loss_4spk-v1
# values. 80-bin log-mel normalized per feature over the whole recording, 18 FastConformer layers, no streaming.
OFFLINE_HF_ID = "nvidia/diar_sortformer_4spk-v1"


def _offline_arch(fc_d_model: int, tf_d_model: int, n_layers: int, n_heads: int, conv_channels: int,
                  tf_layers: int, tf_inner: int, tf_heads: int) -> Dict[str, Any]:
    cfg = _arch(fc_d_model, tf_d_model, n_layers, n_heads, conv_channels, tf_layers, tf_inner, tf_heads)
    cfg["streaming_mode"] = False
    cfg["preprocessor"].update({"normalize": "per_feature", "features": 80})
    cfg["encoder"]["feat_in"] = 80
    for key in ("spkcache_len", "fifo_len", "chunk_len", "spkcache_update_period", "chunk_left_context",
                "chunk_right_context", "spkcache_sil_frames_per_spk", "causal_attn_rate", "causal_attn_rc"):
        cfg["sortformer_modules"].pop(key)
    return cfg


OFFLINE_ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    # the released v1 size: 18 FastConformer layers (512), 18 Transformer layers (192), ~123M parameters
    "full": _offline_arch(512, 192, n_layers=18, n_heads=8, conv_channels=256, tf_layers=18, tf_inner=768,
                          tf_heads=8),
    "tiny": _offline_arch(64, 32, n_layers=2, n_heads=4, conv_channels=16, tf_layers=2, tf_inner=64, tf_heads=4),
}


def _quiet_nemo() -> None:
    os.environ.setdefault("NEMO_TESTING", "0")
    try:
        from nemo.utils import logging as nemo_logging

        nemo_logging.setLevel(logging.ERROR)
    except Exception:  # noqa: BLE001 - logging only
        pass


# Head fits: logits fitted to +-margin. 4 gives a calibrated head (p in ~0.02..0.98, no two compression scores
# equal); a saturated fit (stretched to +-margin per standard deviation) gives a confident one like a trained
# model's: ~90 % of the frames read > 0.999 or < 0.001, speech mostly exactly 1.0, so the compression scores of
# many frames are exactly equal and the top-k's tie rule decides (docs/parity.md). Steeper heads also amplify
# float rounding at speaker changes: 24 ties every compression on synthetic voices; espeak-ng speech, which a
# random encoder separates less well, needs 44 for ties in at least 3 compressions per preset.
CALIBRATED_MARGIN = 4.0
SATURATED_MARGIN = 24.0
ESPEAK_SATURATED_MARGIN = 44.0
VOICES = ("synthetic", "espeak")


def random_model(size: str, seed: int = 0, calibrate: bool = True, saturated: bool = False,
                 voices: str = "synthetic", margin: Optional[float] = None, offline: bool = False):
    """Random init of the real architecture.

    With ``calibrate`` (default) the speaker head alone is then fitted by ridge regression to a 4-speaker
    conversation (``voices``: synthetic, or espeak-ng speech), so predictions behave like a trained model's:
    high during a speaker's turns, low in pauses, overlaps. A purely random head outputs nearly constant
    probabilities, which never exercises the speaker-cache compression (speech > 0.5, silence < 0.2, positive
    scores) and packs the compression scores so tightly that float rounding decides the top-k. With
    ``saturated`` the fit is stretched to +-``margin`` (default SATURATED_MARGIN) per standard deviation:
    the confident regime of a trained model, with ties.
    """
    import torch
    from omegaconf import OmegaConf
    from nemo.collections.asr.models import SortformerEncLabelModel

    table = OFFLINE_ARCHITECTURES if offline else ARCHITECTURES
    if size not in table:
        raise SourceError(f"unknown random architecture {size!r}; choose one of {', '.join(table)}")
    _quiet_nemo()
    torch.manual_seed(seed)
    cfg = OmegaConf.create(copy.deepcopy(table[size]))
    model = (prepare_offline if offline else prepare)(SortformerEncLabelModel(cfg=cfg))
    if calibrate or saturated:
        if margin is None:
            margin = SATURATED_MARGIN if saturated else CALIBRATED_MARGIN
        calibrate_head(model, seed=seed, margin=margin, voices=voices, saturate=saturated)
    return model


def saturated_model(size: str, seed: int = 0, voices: str = "synthetic", margin: Optional[float] = None):
    """A random-init model whose head is fitted to predict like a confident trained model (see random_model)."""
    return random_model(size, seed=seed, saturated=True, voices=voices, margin=margin)


def pin_slot(model, slot: int, probability: float) -> float:
    """Make speaker slot ``slot`` predict exactly ``probability`` (float32) on every frame: its head row is
    zeroed and its bias set to a logit whose sigmoid is exactly that value in torch and in the exported
    graphs. Used to land NeMo's decisions exactly on their boundaries (p = 0.5 vs ``preds > 0.5``; a silent
    frame's sum = 0.2 vs ``sum < sil_threshold``). Returns the logit."""
    import numpy as np
    import torch

    from .graphs import speaker_sigmoid

    target = torch.tensor(probability, dtype=torch.float32)
    guess = np.float32(np.log(probability / (1.0 - probability)))
    ulp = np.spacing(np.abs(guess)) if guess != 0 else np.float32(0)
    for d in sorted(range(-256, 257), key=abs):  # the nearest float32 logit that works
        x = torch.tensor(np.float32(guess + d * ulp), dtype=torch.float32)
        if torch.sigmoid(x) == target and speaker_sigmoid(x) == target:
            break
    else:
        raise ValueError(f"no float32 logit gives exactly p = {probability} in both sigmoids")
    head = model.sortformer_modules.single_hidden_to_spks
    with torch.no_grad():
        head.weight[slot].zero_()
        head.bias[slot] = x
    return float(x)


def calibrate_head(model, seed: int = 0, seconds: float = 90.0, margin: float = CALIBRATED_MARGIN,
                   ridge: float = 1e-2, voices: str = "synthetic", saturate: bool = False) -> None:
    """Fit ``single_hidden_to_spks`` so its logits approach +margin while a speaker talks, -margin otherwise
    (``saturate``: then recentred and stretched to +-margin per standard deviation)."""
    import numpy as np
    import torch

    from sortformer_triton.presets import FRAME_SECONDS
    from sortformer_triton.samples import conversation, espeak_conversation

    if voices not in VOICES:
        raise ValueError(f"voices must be one of {VOICES}")
    make = conversation if voices == "synthetic" else espeak_conversation
    audio, turns = make(seconds, n_speakers=4, seed=1000 + seed)
    mods = model.sortformer_modules
    with torch.no_grad():
        x = torch.from_numpy(audio).unsqueeze(0)
        feats, length = model.process_signal(audio_signal=x, audio_signal_length=torch.tensor([x.shape[1]]))
        emb, emb_len = model.frontend_encoder(processed_signal=feats, processed_signal_length=length)
        mask = mods.length_to_mask(emb_len, emb.shape[1])
        hidden = model.transformer_encoder(encoder_states=emb, encoder_mask=mask)
        hidden = torch.relu(mods.first_hidden_to_hidden(torch.relu(hidden)))[0].double().numpy()
    n = hidden.shape[0]
    target = -margin * np.ones((n, mods.n_spk))
    for t in turns:
        a, b = int(t.start / FRAME_SECONDS), int(np.ceil(t.end / FRAME_SECONDS))
        target[a:b, t.speaker] = margin
    h = np.concatenate([hidden, np.ones((n, 1))], axis=1)
    scale = h.std(axis=0) + 1e-6
    hs = h / scale
    w = np.linalg.solve(hs.T @ hs + ridge * n * np.eye(hs.shape[1]), hs.T @ target) / scale[:, None]
    if saturate:
        # Ridge shrinks the fit towards the mean, so a random encoder's logits rarely cross 0: move each
        # speaker's threshold to the quantile of its talk time and stretch to `margin` per standard deviation,
        # as a trained model is confident: most frames saturate (p exactly 1.0, or ~1e-10).
        z = h @ w
        active = (target > 0).mean(axis=0)
        for s in range(mods.n_spk):
            threshold = np.quantile(z[:, s], 1.0 - active[s]) if 0 < active[s] < 1 else 0.0
            stretch = margin / max(z[:, s].std(), 1e-9)
            w[:, s] *= stretch
            w[-1, s] -= threshold * stretch
    with torch.no_grad():
        mods.single_hidden_to_spks.weight.copy_(torch.from_numpy(w[:-1].T).float())
        mods.single_hidden_to_spks.bias.copy_(torch.from_numpy(w[-1]).float())


def load_model(source: str, seed: int = 0, offline: bool = False):
    """Load from ``full``/``tiny`` (random init), a ``.nemo`` path, or a Hugging Face id.

    ``offline``: the offline Sortformer v1 family (``nvidia/diar_sortformer_4spk-v1``: whole-recording
    features, no streaming) instead of the streaming v2/v2.1 one."""
    if source in RANDOM_SOURCES:
        return random_model(source, seed=seed, offline=offline)
    from nemo.collections.asr.models import SortformerEncLabelModel

    _quiet_nemo()
    path = Path(source)
    fallback = "--offline-model full" if offline else "--model full"
    if source.endswith(".nemo") or path.exists():
        if not path.is_file():
            raise SourceError(f"model file not found: {source}")
        model = _restore_nemo(path, streaming=not offline)
    else:
        if "/" not in source:
            raise SourceError(
                f"{source!r} is neither {' / '.join(RANDOM_SOURCES)}, an existing .nemo file, nor a Hugging Face id "
                "(owner/name)"
            )
        try:
            model = SortformerEncLabelModel.from_pretrained(source, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - re-raised with the reason a user needs
            raise SourceError(
                f"could not load {source!r} from Hugging Face ({type(exc).__name__}: {exc}). It needs internet "
                f"access; use a local .nemo file or {fallback} for a random-init model of the real architecture."
            ) from exc
    return prepare_offline(model) if offline else prepare(model)


def _restore_nemo(path: Path, streaming: bool = True):
    from nemo.collections.asr.models import SortformerEncLabelModel
    from nemo.core.classes import ModelPT

    try:
        cfg = ModelPT.restore_from(str(path), return_config=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{path} is not a readable .nemo archive ({type(exc).__name__}: {exc})") from exc
    target = str(cfg.get("target", ""))
    if not target.endswith("SortformerEncLabelModel"):
        raise SourceError(
            f"{path} holds a {target or 'model of unknown class'}, not a Sortformer diarizer "
            "(nemo.collections.asr.models.SortformerEncLabelModel)"
        )
    if streaming and not cfg.get("streaming_mode", False):
        raise SourceError(f"{path} is not a streaming Sortformer (streaming_mode is false); an offline Sortformer "
                          "(e.g. diar_sortformer_4spk-v1) exports with --offline-model")
    if not streaming and cfg.get("streaming_mode", False):
        raise SourceError(f"{path} is a streaming Sortformer (streaming_mode is true); export it with --model")
    return SortformerEncLabelModel.restore_from(str(path), map_location="cpu")


def prepare(model):
    """Eval mode on CPU, async streaming update (the batched, fixed-buffer path), causal features checked."""
    model = model.to("cpu").eval()
    model.async_streaming = True
    check_causal_features(model)
    return model


def prepare_offline(model):
    """Eval mode on CPU, an offline model (streaming_mode false) whose features the offline graph computes."""
    model = model.to("cpu").eval()
    if getattr(model, "streaming_mode", False):
        raise SourceError("this is a streaming Sortformer (streaming_mode is true); export it with --model")
    norm = model.cfg.preprocessor.get("normalize", None)
    if norm not in ("per_feature", None, "NA", "None", "none", ""):
        raise SourceError(f"unsupported feature normalization {norm!r} for the offline export (per_feature or none)")
    _check_features(model, mel_bins=None)
    return model


def check_causal_features(model) -> None:
    cfg = model.cfg.preprocessor
    norm = cfg.get("normalize", None)
    if norm not in (None, "NA", "None", "none", ""):
        raise SourceError(
            f"the model's preprocessor normalizes features per utterance (normalize={norm!r}); that needs the whole "
            "recording and cannot be computed while streaming. Released streaming checkpoints use normalize: NA. "
            "An offline Sortformer (e.g. nvidia/diar_sortformer_4spk-v1) exports with --offline-model."
        )
    _check_features(model, mel_bins=128)


def _check_features(model, mel_bins: Optional[int]) -> None:
    feats = model.preprocessor.featurizer
    problems = []
    if int(feats.n_fft) != 512 or int(feats.hop_length) != 160 or int(feats.win_length) != 400:
        problems.append(f"n_fft/hop/win = {feats.n_fft}/{feats.hop_length}/{feats.win_length}, expected 512/160/400")
    if getattr(feats, "exact_pad", False):
        problems.append("exact_pad STFT")
    if int(feats.frame_splicing) != 1:
        problems.append(f"frame_splicing={feats.frame_splicing}")
    if mel_bins is not None and feats.fb.shape[1] != mel_bins:
        problems.append(f"{feats.fb.shape[1]} mel bins, expected {mel_bins}")
    if not feats.log or feats.log_zero_guard_type != "add":
        problems.append("features are not log(x + guard)")
    if float(getattr(feats, "mag_power", 2.0)) != 2.0:
        problems.append(f"mag_power={feats.mag_power}, expected 2 (power spectrum)")
    if int(model.encoder.subsampling_factor) != 8:
        problems.append(f"subsampling factor {model.encoder.subsampling_factor}, expected 8")
    if problems:
        raise SourceError("unsupported feature configuration for export: " + "; ".join(problems))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
