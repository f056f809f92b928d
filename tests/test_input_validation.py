"""The preprocessor graph refuses bad audio (INPUT_ERROR) and a refused request changes no state.

Checked on the exported tiny model's ONNX graphs in onnxruntime (the graphs production serves):

- every kind of bad request gets exactly its ``contract.ERR_*`` bit, valid requests get 0;
- a bad row in a batch leaves the other rows' outputs and next states bit-identical to a batch without it;
- a stream with refused requests inserted anywhere (first request included) ends with exactly the
  predictions of the same stream without them;
- the postprocessor's message names every problem.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from sortformer_triton import contract as c
from sortformer_triton.inprocess import StatefulGraph, profile_feeds, repository_graphs
from sortformer_triton.presets import get_preset
from sortformer_triton.protocol import PredictionAssembler, iter_steps
from sortformer_triton.samples import conversation

PRESET = get_preset("low")
STEP = PRESET.step_samples


@pytest.fixture(scope="module")
def graphs(tiny_repository: Path, tiny_export_info) -> Tuple[StatefulGraph, StatefulGraph]:
    """The preset's preprocessor and sortformer ONNX sessions, loaded once per module."""
    return repository_graphs(tiny_repository / "local", PRESET, int(tiny_export_info["emb_dim"]))


def _fresh(graph: StatefulGraph) -> StatefulGraph:
    """The same session with no sequence state (each test keeps its own)."""
    return StatefulGraph(graph.fn, graph.io)


def _good_audio(rng: np.random.Generator) -> np.ndarray:
    return (0.1 * rng.standard_normal(STEP)).astype(np.float32)


# (name, audio mutation, AUDIO_LENGTH, the stream ended before this request, expected bits)
BAD_CASES = [
    ("negative length", None, -1, False, c.ERR_LENGTH_NEGATIVE),
    ("length over step", None, STEP + 1, False, c.ERR_LENGTH_OVER_STEP),
    ("nan", ("nan", 17), STEP, False, c.ERR_NOT_FINITE),
    ("inf", ("inf", 0), STEP, False, c.ERR_NOT_FINITE),
    ("-inf in padding", ("-inf", STEP - 1), 100, False, c.ERR_NOT_FINITE),
    ("int16 scale", ("scale", 32767.0), STEP, False, c.ERR_AMPLITUDE),
    ("just over the limit", ("set", c.MAX_ABS_AMPLITUDE * 1.001), STEP, False, c.ERR_AMPLITUDE),
    ("audio after the end", None, 10, True, c.ERR_AFTER_END),
    ("nan and too long", ("nan", 3), STEP + 5, False, c.ERR_NOT_FINITE | c.ERR_LENGTH_OVER_STEP),
]


def _mutate(audio: np.ndarray, how: Optional[Tuple[str, float]]) -> np.ndarray:
    audio = audio.copy()
    if how is None:
        return audio
    kind, value = how
    if kind == "nan":
        audio[int(value)] = np.nan
    elif kind == "inf":
        audio[int(value)] = np.inf
    elif kind == "-inf":
        audio[int(value)] = -np.inf
    elif kind == "scale":
        audio *= value / np.abs(audio).max()
    elif kind == "set":
        audio[5] = value
    return audio


def _run_pre(pre: StatefulGraph, ids: List[int], starts: List[bool], audio: np.ndarray, lengths: List[int]) -> Dict[str, np.ndarray]:
    return pre.run(ids, starts, {c.AUDIO: audio, c.AUDIO_LENGTH: np.array([[n] for n in lengths], c.AUDIO_LENGTH_TENSOR.dtype)})


@pytest.mark.parametrize("name, mutation, length, ended, bits", BAD_CASES, ids=[b[0] for b in BAD_CASES])
def test_bad_row_gets_its_error_and_changes_nothing(graphs, name, mutation, length, ended, bits) -> None:
    pre = _fresh(graphs[0])
    rng = np.random.default_rng(1)
    first = np.stack([_good_audio(rng) for _ in range(3)])
    # three streams, one step each; stream 2's step ends its audio when the case needs that
    _run_pre(pre, [1, 2, 3], [True] * 3, first, [STEP, 10 if ended else STEP, STEP])
    before = {sid: {k: v.copy() for k, v in pre.states[sid].items()} for sid in (1, 2, 3)}

    good = np.stack([_good_audio(rng) for _ in range(3)])
    bad = good.copy()
    bad[1] = _mutate(good[1], mutation)
    clean_pre = _fresh(pre)
    clean_pre.states = {sid: {k: v.copy() for k, v in s.items()} for sid, s in before.items()}

    out = _run_pre(pre, [1, 2, 3], [False] * 3, bad, [STEP, length, STEP])
    assert out[c.INPUT_ERROR].ravel().tolist() == [0, bits, 0]
    assert c.describe_input_error(bits)
    for key, value in before[2].items():  # the refused row: every state passed on unchanged
        np.testing.assert_array_equal(pre.states[2][key], value, err_msg=key)
    assert int(out[c.FEATURE_LENGTH][1, 0]) == 0  # no chunk for the sortformer step

    ref = _run_pre(clean_pre, [1, 3], [False] * 2, good[[0, 2]], [STEP, STEP])
    for key in ref:  # the other rows: bit-identical to a batch without the bad row
        np.testing.assert_array_equal(out[key][[0, 2]], ref[key], err_msg=key)
    for sid in (1, 3):
        for key, value in clean_pre.states[sid].items():
            np.testing.assert_array_equal(pre.states[sid][key], value, err_msg=f"{sid} {key}")


def _stream(pre: StatefulGraph, step: StatefulGraph, audio: np.ndarray, insert_bad_before: Tuple[int, ...]) -> np.ndarray:
    """One stream through both graphs; a refused (NaN) request is sent before the listed steps."""
    asm = PredictionAssembler()
    bad_audio = np.full(STEP, np.nan, np.float32)
    for k, req in enumerate(iter_steps(PRESET, audio)):
        if k in insert_bad_before:
            out = _run_pre(pre, [7], [req.start], bad_audio[None], [STEP])
            assert int(out[c.INPUT_ERROR][0, 0]) & c.ERR_NOT_FINITE  # (+ ERR_AFTER_END in the flush steps)
            feeds = {n: out[n] for n in (c.FEATURES, c.FEATURE_LENGTH, c.LEFT_CONTEXT, c.CHUNK_INDEX)}
            feeds.update(profile_feeds([None], [0]))
            result = step.run([7], [req.start], feeds)
            assert int(result[c.N_CONFIRMED][0, 0]) == 0 and int(result[c.N_TENTATIVE][0, 0]) == 0
        out = _run_pre(pre, [7], [req.start], req.audio[None], [req.valid])
        assert int(out[c.INPUT_ERROR][0, 0]) == 0
        feeds = {n: out[n] for n in (c.FEATURES, c.FEATURE_LENGTH, c.LEFT_CONTEXT, c.CHUNK_INDEX)}
        feeds.update(profile_feeds([None], [0]))
        result = step.run([7], [req.start], feeds)
        asm.add(result[c.CONFIRMED][0], int(result[c.N_CONFIRMED][0, 0]), int(result[c.FRAME_OFFSET][0, 0]),
                result[c.TENTATIVE][0], int(result[c.N_TENTATIVE][0, 0]), bool(out[c.FINISHED][0, 0]))
    assert asm.finished
    return asm.confirmed


def test_refused_requests_inside_a_stream_change_nothing(graphs) -> None:
    audio = conversation(9.3, n_speakers=3, seed=4)[0]
    pre, step = (_fresh(g) for g in graphs)
    clean = _stream(pre, step, audio, ())
    n_steps = len(list(iter_steps(PRESET, audio)))
    messy = _stream(pre, step, audio, (0, 1, 5, n_steps - 3, n_steps - 1))
    assert clean.shape[0] > 100
    np.testing.assert_array_equal(messy, clean)


def test_messages_name_every_problem() -> None:
    text = c.describe_input_error(c.ERR_LENGTH_OVER_STEP | c.ERR_AMPLITUDE | c.ERR_FEATURES_RANGE | 1 << 20, STEP)
    assert f"{STEP} samples" in text and "int16 / 32768" in text and "beyond +-100" in text and "0x100000" in text
    assert c.describe_input_error(0) == ""
    assert all(c.describe_input_error(bit) for bit, _ in c.INPUT_ERRORS)
