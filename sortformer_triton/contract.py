"""Tensor names, dtypes and shapes of every model in the repository (one source of truth).

Shapes exclude the batch dimension (Triton adds it: every model has max_batch_size > 0).
Symbols: C chunk_len, R right_context, W window mel frames, S spkcache_len, F fifo_len,
D the encoder's embedding size (fc_d_model), M N_MELS, K NF new mel frames per request.

State tensors: an ONNX graph input ``name`` pairs with output ``STATE_OUT_PREFIX + name``. A shared
*prefix* keeps Triton's name-sorted pairing of state inputs and outputs aligned (DESIGN.md pitfalls).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

from .presets import N_MELS, N_SPEAKERS, Preset

STATE_OUT_PREFIX = "out_"

# Segment parameters are bounded to what makes sense for audio (a request may set them on START); the
# median filter's bound also bounds the rows one response needs (segment_rows).
MAX_MEDIAN_FILTER_FRAMES = 63  # frames of 80 ms: a 5 s window
MAX_PAD_SECONDS = 10.0  # pad_onset, pad_offset
MAX_MIN_DURATION_SECONDS = 60.0  # min_duration_on, min_duration_off

# Triton control inputs. START (int32 [1], 1 on a sequence's first request) reaches every stateful model;
# the Python-backend models (which keep their own per-sequence state) also get END and CORRID (uint64 [1]).
START = "START"
END = "END"
CORRID = "CORRID"


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy dtype name: float32, int32, int64; "bytes" for Triton strings (numpy object arrays)
    dims: Tuple[int, ...]

    @property
    def triton_dtype(self) -> str:
        return {"float32": "TYPE_FP32", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bytes": "TYPE_STRING"}[self.dtype]

    @property
    def client_dtype(self) -> str:
        return {"float32": "FP32", "int32": "INT32", "int64": "INT64", "bytes": "BYTES"}[self.dtype]


@dataclasses.dataclass(frozen=True)
class ModelIO:
    """Inputs, outputs and implicit state of one model."""

    inputs: List[Tensor]
    outputs: List[Tensor]
    states: List[Tensor] = dataclasses.field(default_factory=list)

    def state_pairs(self) -> List[Tuple[str, str]]:
        return [(s.name, STATE_OUT_PREFIX + s.name) for s in self.states]


# ---- names --------------------------------------------------------------------------------------
# Ensemble (what clients send and receive)
AUDIO = "AUDIO"
AUDIO_LENGTH = "AUDIO_LENGTH"
CONFIRMED = "CONFIRMED"
N_CONFIRMED = "N_CONFIRMED"
TENTATIVE = "TENTATIVE"
N_TENTATIVE = "N_TENTATIVE"
FRAME_OFFSET = "FRAME_OFFSET"
SEGMENTS = "SEGMENTS"
N_SEGMENTS = "N_SEGMENTS"
FINISHED = "FINISHED"
SPEAKER_NAMES = "SPEAKER_NAMES"  # the slots' names, UTF-8, "" for an unnamed slot (sortformer_triton.speakers)
INPUT_ERROR = "INPUT_ERROR"  # preprocessor -> postprocessor: why a request's audio was refused (0 = valid)
FEATURE_ERROR = "FEATURE_ERROR"  # sortformer -> postprocessor: why a request's features were refused (0 = valid)

# AUDIO_LENGTH is int64: Triton 2.51's HTTP JSON parser wraps a number into the declared integer type, so
# with int32 a length of 4294967296 became 0 (the audio silently ended) and 2**32 + 5 became 5; as int64
# every length a client can write reaches the preprocessor graph's range check (a JSON number beyond int64
# is a parse error)
AUDIO_LENGTH_TENSOR = Tensor(AUDIO_LENGTH, "int64", (1,))

# speaker profiles (docs/speakers.md): a stream's speaker state saved, and a new stream started from it
PROFILE = "PROFILE"  # float32 [n]: spkcache [S, D], spkcache_preds [S, 4], fifo [F, D], mean_sil_emb [D], flat
PROFILE_HEADER = "PROFILE_HEADER"  # int64 [PROFILE_HEADER_LEN]: see PROFILE_HEADER_FIELDS
SAVED_PROFILE = "SAVED_PROFILE"  # the state after this request, when PROFILE_HEADER asked to save it
SAVED_PROFILE_HEADER = "SAVED_PROFILE_HEADER"
PROFILE_HEADER_FIELDS: Tuple[str, ...] = ("flags", "format", "fingerprint", "spkcache_lengths", "fifo_lengths",
                                          "n_sil_frames")
PROFILE_HEADER_LEN = len(PROFILE_HEADER_FIELDS)
PROFILE_FORMAT = 1  # the layout of PROFILE and its header; a graph refuses any other
PROFILE_RESTORE = 1  # flags bit: START from PROFILE (only on START, from diarizer_<preset>_from_profile)
PROFILE_SAVE = 2  # flags bit: return the state after this request as SAVED_PROFILE
ADMITTED_PROFILE = "ADMITTED_PROFILE"  # admission -> sortformer in diarizer_<preset>: no profile (1 zero)
ADMITTED_PROFILE_HEADER = "ADMITTED_PROFILE_HEADER"  # flags = PROFILE_SAVE when the request says save_profile
SAVE_PROFILE_PARAMETER = "save_profile"  # request parameter (bool): save the state after this request


PROFILE_PARTS: Tuple[str, ...] = ("spkcache", "spkcache_preds", "fifo", "mean_sil_emb")  # PROFILE's order


def profile_shapes(p: Preset, emb_dim: int) -> Tuple[Tuple[int, ...], ...]:
    """The shapes of PROFILE_PARTS (the sortformer's float states), flattened back to back in PROFILE."""
    return ((p.spkcache_len, emb_dim), (p.spkcache_len, N_SPEAKERS), (max(p.fifo_len, 1), emb_dim), (emb_dim,))


def profile_size(p: Preset, emb_dim: int) -> int:
    """Floats in a preset's PROFILE: the speaker cache, its predictions, the FIFO and the silence profile."""
    return sum(math.prod(shape) for shape in profile_shapes(p, emb_dim))


# preprocessor -> sortformer
FEATURES = "FEATURES"
FEATURE_LENGTH = "FEATURE_LENGTH"
LEFT_CONTEXT = "LEFT_CONTEXT"
CHUNK_INDEX = "CHUNK_INDEX"


def ensemble_name(preset: Preset) -> str:
    return f"diarizer_{preset.name}"


def resume_ensemble_name(preset: Preset) -> str:
    """The ensemble whose START request carries a saved speaker profile (later requests: ensemble_name)."""
    return f"diarizer_{preset.name}_from_profile"


def preset_models(preset: Preset) -> Tuple[str, ...]:
    """Every model a preset adds to a repository."""
    return (preprocessor_name(preset), sortformer_name(preset), ensemble_name(preset), resume_ensemble_name(preset))


def preprocessor_name(preset: Preset) -> str:
    return f"preprocessor_{preset.name}"


def sortformer_name(preset: Preset) -> str:
    return f"sortformer_{preset.name}"


POSTPROCESSOR = "postprocessor"
# The ensemble's first step: refuses a START whose segment parameters the postprocessor would refuse, before
# the stateful models see it (a START they ran holds a sequence slot until END or the idle timeout)
ADMISSION = "admission"
ADMITTED_AUDIO_LENGTH = "ADMITTED_AUDIO_LENGTH"  # AUDIO_LENGTH once admitted: the preprocessor waits for it

# ---- input validation ------------------------------------------------------------------------------
# The preprocessor graph checks every request's audio and reports what is wrong as a bit mask in
# INPUT_ERROR; a refused request changes no state (the stream may go on with a corrected request) and the
# postprocessor answers it with an error naming the problems. Checked in the graph, so production (the
# onnxruntime backend, which cannot raise errors) and local serving refuse exactly the same requests.
MAX_ABS_AMPLITUDE = 4.0  # |sample| limit: audio is float in [-1, 1]; 12 dB of headroom for resampler overshoot
ERR_LENGTH_NEGATIVE = 1  # AUDIO_LENGTH < 0
ERR_LENGTH_OVER_STEP = 2  # AUDIO_LENGTH > the samples one step (AUDIO) holds
ERR_NOT_FINITE = 4  # AUDIO holds NaN or +-Inf
ERR_AMPLITUDE = 8  # AUDIO holds |sample| > MAX_ABS_AMPLITUDE (e.g. int16 PCM sent as float without scaling)
ERR_AFTER_END = 16  # samples after the end of the audio (an earlier request had fewer than a full step)
# The sortformer graph checks its own inputs the same way (FEATURE_ERROR): the preprocessor never sends these,
# a client calling sortformer_<preset> directly may; a refused request changes none of the sequence's state.
MAX_ABS_FEATURE = 100.0  # log-mel frames of admitted audio (|sample| <= 4) stay within about +-21
MAX_CHUNK_INDEX = 2 ** 40  # FRAME_OFFSET = CHUNK_INDEX x chunk_len stays far inside int64
ERR_FEATURES_NOT_FINITE = 32  # FEATURES hold NaN or +-Inf
ERR_FEATURES_RANGE = 64  # FEATURES beyond +-MAX_ABS_FEATURE
ERR_FEATURE_LENGTH = 128  # FEATURE_LENGTH outside 0..the window's mel frames
ERR_LEFT_CONTEXT = 256  # LEFT_CONTEXT outside 0..the preset's left context
ERR_CHUNK_INDEX = 512  # CHUNK_INDEX outside 0..MAX_CHUNK_INDEX
# ... and its speaker profile inputs (a refused START starts from an empty state; the postprocessor refuses the
# stream until END: its audio already went in)
MAX_ABS_PROFILE = 1.0e4  # embeddings of real audio stay far inside; a corrupt file's garbage rarely does
ERR_PROFILE_FLAGS = 1024  # unknown PROFILE_HEADER flags, or a restore on a request without START
ERR_PROFILE_SIZE = 2048  # PROFILE does not have profile_size(preset, D) values
ERR_PROFILE_ORIGIN = 4096  # another format version, or saved by another model or preset (fingerprint)
ERR_PROFILE_STATE = 8192  # lengths out of range, values not finite or beyond MAX_ABS_PROFILE, preds outside [0, 1]
PROFILE_ERRORS = ERR_PROFILE_FLAGS | ERR_PROFILE_SIZE | ERR_PROFILE_ORIGIN | ERR_PROFILE_STATE

INPUT_ERRORS: Tuple[Tuple[int, str], ...] = (
    (ERR_LENGTH_NEGATIVE, "AUDIO_LENGTH is negative"),
    (ERR_LENGTH_OVER_STEP, "AUDIO_LENGTH is larger than the {step} one step holds (chunk_len x 1280)"),
    (ERR_NOT_FINITE, "AUDIO holds NaN or infinite samples"),
    (ERR_AMPLITUDE, "AUDIO holds samples beyond +-{limit:g} (float audio must be in [-1, 1]; scale integer "
                    "PCM, e.g. int16 / 32768)"),
    (ERR_AFTER_END, "audio after the end of the stream's audio (an earlier request had fewer valid samples than "
                    "a full step, which ends the audio; only 0-sample flush steps may follow)"),
    (ERR_FEATURES_NOT_FINITE, "FEATURES hold NaN or infinite values"),
    (ERR_FEATURES_RANGE, "FEATURES hold values beyond +-{feature_limit:g} (log-mel frames stay within about +-21)"),
    (ERR_FEATURE_LENGTH, "FEATURE_LENGTH is outside 0..the mel frames of the feature window"),
    (ERR_LEFT_CONTEXT, "LEFT_CONTEXT is outside 0..the preset's left context"),
    (ERR_CHUNK_INDEX, "CHUNK_INDEX is outside 0..2**40"),
    (ERR_PROFILE_FLAGS, "PROFILE_HEADER flags are unknown, or restore a profile on a request that is not START"),
    (ERR_PROFILE_SIZE, "PROFILE does not hold this preset's profile size (spkcache, preds, FIFO, silence profile)"),
    (ERR_PROFILE_ORIGIN, "the speaker profile was saved by another model or preset, or in another format version "
                         "(its fingerprint does not match this graph's)"),
    (ERR_PROFILE_STATE, "the speaker profile is corrupt: lengths out of range, values not finite or beyond "
                        "+-1e4, or predictions outside [0, 1]"),
)


def describe_input_error(code: int, step_samples: Optional[int] = None) -> str:
    """The problems an INPUT_ERROR bit mask reports, as one message ('' for 0)."""
    code = int(code)
    known = 0
    parts = []
    for bit, text in INPUT_ERRORS:
        known |= bit
        if code & bit:
            step = "samples" if step_samples is None else f"{step_samples} samples"
            parts.append(text.format(step=step, limit=MAX_ABS_AMPLITUDE, feature_limit=MAX_ABS_FEATURE))
    if code & ~known:
        parts.append(f"unknown input error bits {code & ~known:#x}")
    return "; ".join(parts)


# preprocessor state: the last raw samples (a frame reaches 616 samples back; pre-emphasis one more)
AUDIO_TAIL_SAMPLES = 1024


def preprocessor_io(p: Preset) -> ModelIO:
    return ModelIO(
        inputs=[
            Tensor(AUDIO, "float32", (p.step_samples,)),
            AUDIO_LENGTH_TENSOR,
        ],
        outputs=[
            Tensor(FEATURES, "float32", (p.window_mel_frames, N_MELS)),
            Tensor(FEATURE_LENGTH, "int64", (1,)),
            Tensor(LEFT_CONTEXT, "int64", (1,)),
            Tensor(CHUNK_INDEX, "int64", (1,)),
            Tensor(FINISHED, "int32", (1,)),
            Tensor(INPUT_ERROR, "int32", (1,)),
        ],
        states=[
            Tensor("audio_tail", "float32", (AUDIO_TAIL_SAMPLES,)),
            Tensor("feat_buffer", "float32", (p.feature_buffer_frames, N_MELS)),
            # samples seen, mel frames computed, chunks emitted, audio ended (0/1)
            Tensor("counters", "int64", (4,)),
        ],
    )


def sortformer_io(p: Preset, emb_dim: int) -> ModelIO:
    return ModelIO(
        inputs=[
            Tensor(FEATURES, "float32", (p.window_mel_frames, N_MELS)),
            Tensor(FEATURE_LENGTH, "int64", (1,)),
            Tensor(LEFT_CONTEXT, "int64", (1,)),
            Tensor(CHUNK_INDEX, "int64", (1,)),
            Tensor(PROFILE, "float32", (-1,)),
            Tensor(PROFILE_HEADER, "int64", (PROFILE_HEADER_LEN,)),
        ],
        outputs=[
            Tensor(CONFIRMED, "float32", (p.chunk_len, N_SPEAKERS)),
            Tensor(N_CONFIRMED, "int32", (1,)),
            Tensor(TENTATIVE, "float32", (max(p.right_context, 1), N_SPEAKERS)),
            Tensor(N_TENTATIVE, "int32", (1,)),
            Tensor(FRAME_OFFSET, "int64", (1,)),
            Tensor(FEATURE_ERROR, "int32", (1,)),
            Tensor(SAVED_PROFILE, "float32", (-1,)),
            Tensor(SAVED_PROFILE_HEADER, "int64", (PROFILE_HEADER_LEN,)),
        ],
        states=[
            Tensor("spkcache", "float32", (p.spkcache_len, emb_dim)),
            Tensor("spkcache_preds", "float32", (p.spkcache_len, N_SPEAKERS)),
            Tensor("spkcache_lengths", "int64", (1,)),
            Tensor("fifo", "float32", (max(p.fifo_len, 1), emb_dim)),
            Tensor("fifo_lengths", "int64", (1,)),
            Tensor("mean_sil_emb", "float32", (emb_dim,)),
            Tensor("n_sil_frames", "int64", (1,)),
        ],
    )


def segment_rows(chunk_len: int) -> int:
    """Rows of SEGMENTS per response of a preset with ``chunk_len``: every segment one response can
    finalize fits, so the last response (END) always delivers everything.

    One response settles at most ``chunk_len`` frames, plus the median filter's half window at the end
    of the stream; over n frames a speaker has at most ceil(n / 2) segments, plus the chain and the group
    held back from earlier responses (<= 2), plus one of margin.
    """
    settled = int(chunk_len) + MAX_MEDIAN_FILTER_FRAMES // 2
    return N_SPEAKERS * ((settled + 1) // 2 + 3)


# The postprocessor, the ensemble's last step, produces every ensemble output: the stateful steps' outputs
# reach it under STEP_PREFIX + name and it passes them through. Triton 2.51's ensemble prunes the steps whose
# outputs a request does not ask for -- also a step whose outputs a later step still needs -- so with outputs
# spread over several steps a request for some of them ran the stateful steps and skipped the postprocessor
# (or deadlocked); with every output made by one last step, a subset is only a filter.
STEP_PREFIX = "STEP_"
PASSED_THROUGH: Tuple[str, ...] = (CONFIRMED, N_CONFIRMED, TENTATIVE, N_TENTATIVE, FRAME_OFFSET, FINISHED,
                                   SAVED_PROFILE, SAVED_PROFILE_HEADER)


def step_tensor(name: str) -> str:
    """The ensemble-internal name of a stateful step's output that the postprocessor passes through."""
    return STEP_PREFIX + name


def admission_io() -> ModelIO:
    """AUDIO_LENGTH in, the same out: the preprocessor step reads it from here, so it runs only on admitted
    requests (an ensemble stops at a step's error). In ``diarizer_<preset>`` it also makes the sortformer's
    profile inputs: no profile, and the save flag of the request's ``save_profile`` parameter."""
    return ModelIO(inputs=[AUDIO_LENGTH_TENSOR],
                   outputs=[dataclasses.replace(AUDIO_LENGTH_TENSOR, name=ADMITTED_AUDIO_LENGTH),
                            Tensor(ADMITTED_PROFILE, "float32", (-1,)),
                            Tensor(ADMITTED_PROFILE_HEADER, "int64", (PROFILE_HEADER_LEN,))])


def postprocessor_io() -> ModelIO:
    """The postprocessor serves every preset: chunk-sized tensors have a variable first dim."""
    passed = [
        Tensor(CONFIRMED, "float32", (-1, N_SPEAKERS)),
        Tensor(N_CONFIRMED, "int32", (1,)),
        Tensor(TENTATIVE, "float32", (-1, N_SPEAKERS)),
        Tensor(N_TENTATIVE, "int32", (1,)),
        Tensor(FRAME_OFFSET, "int64", (1,)),
        Tensor(FINISHED, "int32", (1,)),
        Tensor(SAVED_PROFILE, "float32", (-1,)),
        Tensor(SAVED_PROFILE_HEADER, "int64", (PROFILE_HEADER_LEN,)),
    ]
    assert tuple(t.name for t in passed) == PASSED_THROUGH
    return ModelIO(
        inputs=[dataclasses.replace(t, name=step_tensor(t.name)) for t in passed] + [
            Tensor(INPUT_ERROR, "int32", (1,)),
            Tensor(FEATURE_ERROR, "int32", (1,)),
        ],
        outputs=passed + [
            # rows: start s, end s, speaker, finalized (1.0) / tentative (0.0); segment_rows(C) of them
            Tensor(SEGMENTS, "float32", (-1, 4)),
            Tensor(N_SEGMENTS, "int32", (1,)),
            Tensor(SPEAKER_NAMES, "bytes", (N_SPEAKERS,)),
        ],
    )


def ensemble_io(p: Preset, resume: bool = False) -> ModelIO:
    """What clients send and receive; every output comes from the postprocessor, with the preset's fixed dims.
    ``resume``: the ensemble of a START from a saved profile, which also takes PROFILE and PROFILE_HEADER."""
    pre, sf, post = preprocessor_io(p), sortformer_io(p, 1), postprocessor_io()
    by = {t.name: t for t in post.outputs + sf.outputs + pre.outputs}  # the steps' fixed dims win
    by[SEGMENTS] = Tensor(SEGMENTS, "float32", (segment_rows(p.chunk_len), 4))
    inputs = list(pre.inputs) + ([t for t in sf.inputs if t.name in (PROFILE, PROFILE_HEADER)] if resume else [])
    return ModelIO(inputs=inputs, outputs=[by[t.name] for t in post.outputs])


def tensor_table_markdown() -> str:
    """The README's tensor table, generated so it cannot drift from the contract (a test compares)."""
    from .presets import Preset

    # a probe preset whose sizes are all distinct, so each number maps back to its symbol
    p = Preset("probe", chunk_len=11, right_context=13, left_context=1, fifo_len=17, spkcache_update_period=19,
               spkcache_len=29)
    emb = 7
    symbols = {p.chunk_len: "C", p.right_context: "R", p.window_mel_frames: "W", p.spkcache_len: "S", p.fifo_len: "F",
               p.step_samples: "C x 1280", p.feature_buffer_frames: "W + 8C + 8", emb: "D", -1: "n",
               segment_rows(p.chunk_len): "G"}

    def dims(t: Tensor) -> str:
        return "[" + ", ".join(symbols.get(d, str(d)) for d in t.dims) + "]"

    rows = ["| model | tensor | kind | dtype | dims (batch dim implied) |", "|---|---|---|---|---|"]
    models = [("diarizer_&lt;preset&gt;", ensemble_io(p)),
              ("diarizer_&lt;preset&gt;_from_profile", ModelIO(ensemble_io(p, resume=True).inputs[2:], [])),
              (ADMISSION, admission_io()),
              ("preprocessor_&lt;preset&gt;", preprocessor_io(p)), ("sortformer_&lt;preset&gt;", sortformer_io(p, emb)),
              (POSTPROCESSOR, postprocessor_io())]
    for model, io in models:
        for kind, tensors in (("input", io.inputs), ("output", io.outputs), ("state", io.states)):
            for t in tensors:
                name = f"{t.name} / {STATE_OUT_PREFIX}{t.name}" if kind == "state" else t.name
                rows.append(f"| {model} | {name} | {kind} | {t.dtype} | {dims(t)} |")
    legend = ("C = chunk_len, R = right_context, W = (left_context + C + R) x 8 mel frames, S = spkcache_len, "
              "F = fifo_len (R and F at least 1), D = encoder width (512 full-size), n = any (the postprocessor "
              "serves every preset; PROFILE / SAVED_PROFILE: P floats, or 1 when none), G = 4 x (floor((C + 32) / 2) + 3) segment rows (every segment one response "
              "can finalize). The stateful graphs also take `START` int32 [1] (Triton's sequence-start "
              "control); the local Python-backend flavour adds `END` int32 [1] and `CORRID` uint64 [1]. The "
              "postprocessor gets the stateful steps' outputs as `STEP_<name>` and passes them on: every "
              "ensemble output comes from that last step, so a request may ask for any subset of them. `admission` "
              "(the first step, shared by every preset) refuses a START with bad segment parameters before the "
              "stateful models see it; the preprocessor reads AUDIO_LENGTH from it, the sortformer its "
              "no-profile PROFILE / PROFILE_HEADER. `diarizer_<preset>_from_profile` is the same ensemble "
              "with PROFILE (P = S x D + 4 S + F x D + D floats) and PROFILE_HEADER from the client, for the "
              "START of a stream from a saved speaker profile (it has every output of diarizer_<preset>; "
              "docs/speakers.md). SPEAKER_NAMES are UTF-8 strings (BYTES), \"\" for an unnamed slot.")
    return "\n".join(rows) + "\n\n" + legend + "\n"
