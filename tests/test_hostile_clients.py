"""Hostile and careless clients, round 2 (issue 12), against a real tritonserver.

Each test sends what the issue's black-box test sent, with raw ``tritonclient`` requests
(``tests/rawseq.py``), and compares the streams with their solo runs:

2. segment parameters on a later request (changed or malformed) do not advance-then-kill the stream:
   they are honoured on START only and ignored afterwards, the stream ends exactly as alone; a request
   asking for only some outputs gets exactly those (equal to the full response's) and the stream goes on;
3. the same sequence id STARTed on two presets at once: two independent streams;
4. END delivers everything: a very_high stream whose last response finalizes more segments than the old
   64 rows ends with every segment of the offline reference;
5. unbounded segment parameters are refused on START with the bound, before anything is allocated;
6. an HTTP JSON ``AUDIO_LENGTH`` beyond int32 (4294967296 wrapped to 0: the audio silently ended) is refused
   and the stream goes on;
7. a refused START takes no sequence slot, even from a raw client that never sends END: more refused
   STARTs than slots, then a good stream starts at once;
8. the internal models validate their own inputs: NaN/Inf/huge FEATURES or out-of-range lengths sent to
   ``sortformer_<preset>`` directly leave that sequence's state unchanged and are flagged (FEATURE_ERROR), which
   the postprocessor turns into a refusal;
9. refusals are INVALID_ARGUMENT (not INTERNAL), so proxies and retry policies do not read them as faults;
10. the client library accepts exactly the sequence ids every protocol accepts (the largest works on all).
"""
from __future__ import annotations

import http.client
import json
import time
from typing import Dict, List, Tuple

import numpy as np
import pytest

from clients.sortformer_client import DiarizationClient, new_sequence_id
from sortformer_triton import contract, repository
from sortformer_triton.presets import get_preset
from sortformer_triton.samples import conversation
from sortformer_triton.timeline import SegmentParams, segments_from_probs
from tests.rawseq import OUTPUTS, RawSequence, solo_run, steps

LOW = get_preset("low")
ULTRA = get_preset("ultra_low")
INVALID = "StatusCode.INVALID_ARGUMENT"


def _audio(seconds: float, seed: int) -> np.ndarray:
    return conversation(seconds, n_speakers=3, seed=seed)[0]


def _solo(url: str, preset, audio: np.ndarray) -> Tuple[np.ndarray, List]:
    return solo_run(url, preset, audio, new_sequence_id())


@pytest.fixture(scope="module")
def audio() -> Dict[str, np.ndarray]:
    return {"low": _audio(7.9, 12001), "ultra_low": _audio(6.1, 12002)}


@pytest.fixture(scope="module")
def solo(tiny_server, audio) -> Dict[str, Tuple[np.ndarray, List]]:
    return {name: _solo(tiny_server.grpc_url, get_preset(name), a) for name, a in audio.items()}


# ---- 2. parameters after START -------------------------------------------------------------------------
@pytest.mark.parametrize("later", [{"onset": "0.9"}, {"median_filter_frames": "abc"}, {"pad_offset": 1e300}])
def test_parameters_on_a_later_request_leave_the_stream_intact(later, tiny_server, audio, solo) -> None:
    seq = RawSequence(tiny_server.grpc_url, LOW, new_sequence_id())
    try:
        for k, request in enumerate(steps(LOW, audio["low"])):
            # after confirmed frames exist (k >= 3), so a refusal after the stateful steps would show
            reply = seq.step(request, parameters=later if k in (3, 5) else None)
            assert reply.error == "", reply.error
        assert seq.assembler.finished
        np.testing.assert_array_equal(seq.assembler.confirmed, solo["low"][0])
        assert seq.finalized == solo["low"][1]
    finally:
        seq.close()


# every subset Triton 2.51's ensemble pruning broke: only the postprocessor's outputs (deadlock after the
# preprocessor moved), only stateful-step outputs (the postprocessor skipped a step), one of each
@pytest.mark.parametrize("subset", [
    ("SEGMENTS", "N_SEGMENTS"), ("CONFIRMED",), ("FINISHED",), ("CONFIRMED", "SEGMENTS"), ("N_TENTATIVE", "FRAME_OFFSET"),
])
def test_a_request_for_some_outputs_gets_them_and_the_stream_goes_on(subset, tiny_server, audio) -> None:
    plan = steps(LOW, audio["low"])
    solo = RawSequence(tiny_server.grpc_url, LOW, new_sequence_id())
    seq = RawSequence(tiny_server.grpc_url, LOW, new_sequence_id())
    try:
        for k, request in enumerate(plan):
            full = solo.send(request.audio, request.valid, request.start, request.end)
            assert full.error == "", full.error
            # confirmed frames exist from k = 3: a step the postprocessor missed would break the next one
            reply = seq.send(request.audio, request.valid, request.start, request.end,
                             outputs=subset if k in (1, 4) else OUTPUTS)
            assert reply.error == "", f"request {k}: {reply.error}"
            assert sorted(reply.outputs) == sorted(subset if k in (1, 4) else OUTPUTS)
            for name, value in reply.outputs.items():
                np.testing.assert_array_equal(value, full.outputs[name], err_msg=f"request {k} {name}")
    finally:
        solo.close()
        seq.close()


# ---- 3. one id, two presets ---------------------------------------------------------------------------
def test_the_same_sequence_id_on_two_presets_runs_two_streams(tiny_server, audio, solo) -> None:
    sid = 3  # small ids are what load tools use
    low, ultra = RawSequence(tiny_server.grpc_url, LOW, sid), RawSequence(tiny_server.grpc_url, ULTRA, sid)
    try:
        plans = [(low, steps(LOW, audio["low"])), (ultra, steps(ULTRA, audio["ultra_low"]))]
        for k in range(max(len(p) for _, p in plans)):
            for seq, plan in plans:
                if k < len(plan):
                    reply = seq.step(plan[k])
                    assert reply.error == "", f"{seq.model} request {k}: {reply.error}"
        for seq, name in ((low, "low"), (ultra, "ultra_low")):
            assert seq.assembler.finished
            np.testing.assert_array_equal(seq.assembler.confirmed, solo[name][0])
            assert seq.finalized == solo[name][1]
    finally:
        low.close()
        ultra.close()


# ---- 4. END delivers everything -----------------------------------------------------------------------
def test_end_delivers_every_segment_of_a_long_step(tiny_server) -> None:
    params = {"min_duration_on": 0.0, "min_duration_off": 0.0, "onset": 0.569, "offset": 0.569}
    noise = np.random.default_rng(12).normal(0.0, 0.3, 40 * 16000).astype(np.float32)
    with DiarizationClient(tiny_server.grpc_url, preset="very_high") as client:
        result = client.diarize(noise, segment_params=params)
    assert result.finished
    offline = segments_from_probs(result.probs, SegmentParams(**params))
    assert len(offline) > 64, f"only {len(offline)} segments: the case does not exceed the old 64 rows"
    key = lambda s: (round(s.start, 3), round(s.end, 3), s.speaker)  # noqa: E731 (SEGMENTS is float32)
    assert sorted(map(key, result.segments)) == sorted(map(key, offline))


# ---- 5 and 9. bounded parameters, invalid-argument codes ---------------------------------------------
@pytest.mark.parametrize("bad, says", [
    ({"median_filter_frames": 1000000001}, "odd integer in 1..63"),
    ({"median_filter_frames": 1000001}, "odd integer in 1..63"),
    ({"pad_offset": "1e300"}, "pad_offset is a duration in seconds in [0, 10]"),
    ({"min_duration_on": "1e9"}, "min_duration_on is a duration in seconds in [0, 60]"),
])
def test_unbounded_parameters_are_refused_on_start(bad, says, tiny_server, audio, solo) -> None:
    plan = steps(LOW, audio["low"])
    seq = RawSequence(tiny_server.grpc_url, LOW, new_sequence_id())
    try:
        reply = seq.send(plan[0].audio, plan[0].valid, start=True, parameters=bad)
        assert reply.outputs is None and says in reply.error and reply.status == INVALID, reply
        for request in plan:  # the client starts again on the same id: a normal stream
            assert seq.step(request).error == ""
        np.testing.assert_array_equal(seq.assembler.confirmed, solo["low"][0])
    finally:
        seq.close()


# ---- 6. HTTP JSON AUDIO_LENGTH beyond int32 ----------------------------------------------------------------
def _http_json(server, sequence_id: int, audio: np.ndarray, length: int) -> Tuple[int, Dict]:
    """One raw HTTP JSON request (the inference key header included), AUDIO_LENGTH as the contract types it."""
    dtype = contract.ensemble_io(LOW).inputs[1]
    assert dtype.name == contract.AUDIO_LENGTH
    body = {"inputs": [
        {"name": contract.AUDIO, "shape": [1, audio.size], "datatype": "FP32", "data": audio.tolist()},
        {"name": contract.AUDIO_LENGTH, "shape": [1, 1], "datatype": dtype.client_dtype, "data": [length]}],
        "parameters": {"sequence_id": sequence_id}}
    conn = http.client.HTTPConnection(server.http_url, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{contract.ensemble_name(LOW)}/infer", body=json.dumps(body),
                     headers={"Content-Type": "application/json", **server.http_inference_headers})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.parametrize("length, status_code, says", [
    (2 ** 32, 400, "AUDIO_LENGTH is larger"), (2 ** 32 + 5, 400, "AUDIO_LENGTH is larger"),
    (2 ** 63 - 1, 400, "AUDIO_LENGTH is larger"), (-(2 ** 32), 400, "AUDIO_LENGTH is negative"),
    (2 ** 64, 500, "Unable to parse 'data'"),  # beyond int64: Triton's HTTP frontend itself (its status code)
])
def test_http_json_audio_length_beyond_int32_is_refused(length, status_code, says, tiny_server, audio,
                                                        solo) -> None:
    plan = steps(LOW, audio["low"])
    seq = RawSequence(tiny_server.grpc_url, LOW, new_sequence_id())
    try:
        for k, request in enumerate(plan):
            if k == 4:  # mid-stream, on the same sequence over HTTP
                status, out = _http_json(tiny_server, seq.sequence_id, request.audio, length)
                assert status == status_code and says in out.get("error", ""), (status, out)
            assert seq.step(request).error == ""
        np.testing.assert_array_equal(seq.assembler.confirmed, solo["low"][0])
        assert seq.finalized == solo["low"][1]
    finally:
        seq.close()


def test_refused_starts_take_no_sequence_slot(tiny_server, audio, solo) -> None:
    config = tiny_server.model_repository / contract.sortformer_name(LOW) / "config.pbtxt"
    slots = repository.parse(config.read_text()).sequence_batching.oldest.max_candidate_sequences
    plan = steps(LOW, audio["low"])
    for k in range(slots + 4):  # a raw client that never sends END; before: the 17th waited for a slot
        seq = RawSequence(tiny_server.grpc_url, LOW, new_sequence_id(), timeout_s=10)
        try:
            reply = seq.send(plan[0].audio, plan[0].valid, start=True, parameters={"median_filter_frames": 4})
            assert reply.status == INVALID and "odd integer in 1..63" in reply.error, f"START {k}: {reply}"
        finally:
            seq.close()
    good = RawSequence(tiny_server.grpc_url, LOW, new_sequence_id(), timeout_s=10)
    try:
        t0 = time.monotonic()
        assert good.step(plan[0]).error == ""
        assert time.monotonic() - t0 < 5, "the good START waited for a slot"
        for request in plan[1:]:
            assert good.step(request).error == ""
        np.testing.assert_array_equal(good.assembler.confirmed, solo["low"][0])
        assert good.finalized == solo["low"][1]
    finally:
        good.close()


def test_refusals_are_invalid_argument(tiny_server, audio) -> None:
    plan = steps(LOW, audio["low"])
    seq = RawSequence(tiny_server.grpc_url, LOW, new_sequence_id())
    try:
        assert seq.step(plan[0]).error == ""
        nan = np.where(np.arange(LOW.step_samples) == 9, np.nan, plan[1].audio).astype(np.float32)
        reply = seq.send(nan, LOW.step_samples)
        assert "NaN" in reply.error and reply.status == INVALID, reply
        reply = RawSequence(tiny_server.grpc_url, LOW, new_sequence_id()).send(plan[1].audio, LOW.step_samples)
        assert "START" in reply.error and reply.status == INVALID, reply  # Triton's own: no START
    finally:
        seq.close()


# ---- 8. internal models called directly --------------------------------------------------------------
def _direct(client, model: str, inputs: Dict[str, np.ndarray], outputs, sequence_id: int, start: bool = False,
            end: bool = False) -> Dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                          sequence_id=sequence_id, sequence_start=start, sequence_end=end, client_timeout=60)
    return {o: result.as_numpy(o) for o in outputs}


def _bad_features(good: Dict[str, np.ndarray]) -> Dict[str, Tuple[Dict[str, np.ndarray], int]]:
    def with_(name: str, value) -> Dict[str, np.ndarray]:
        bad = {k: v.copy() for k, v in good.items()}
        bad[name] = np.asarray(value, good[name].dtype).reshape(good[name].shape) if np.ndim(value) else \
            np.full_like(good[name], value)
        return bad

    feats = good[contract.FEATURES]
    poke = lambda v: np.where(np.arange(feats.size).reshape(feats.shape) == 5, v, feats)  # noqa: E731
    window = feats.shape[1]
    return {
        "nan": (with_(contract.FEATURES, poke(np.nan)), contract.ERR_FEATURES_NOT_FINITE),
        "inf": (with_(contract.FEATURES, poke(-np.inf)), contract.ERR_FEATURES_NOT_FINITE),
        "huge": (with_(contract.FEATURES, poke(1e30)), contract.ERR_FEATURES_RANGE),
        "length over": (with_(contract.FEATURE_LENGTH, window + 1), contract.ERR_FEATURE_LENGTH),
        "length negative": (with_(contract.FEATURE_LENGTH, -1), contract.ERR_FEATURE_LENGTH),
        "left 1e9": (with_(contract.LEFT_CONTEXT, 10 ** 9), contract.ERR_LEFT_CONTEXT),
        "left negative": (with_(contract.LEFT_CONTEXT, -1), contract.ERR_LEFT_CONTEXT),
        "chunk negative": (with_(contract.CHUNK_INDEX, -1), contract.ERR_CHUNK_INDEX),
        "chunk huge": (with_(contract.CHUNK_INDEX, 2 ** 62), contract.ERR_CHUNK_INDEX),
        # a speaker profile restored on a request that is not START, unknown flags
        "restore mid-stream": (with_(contract.PROFILE_HEADER, [contract.PROFILE_RESTORE, 1, 0, 0, 0, 0]),
                               contract.ERR_PROFILE_FLAGS | contract.ERR_PROFILE_SIZE | contract.ERR_PROFILE_ORIGIN),
        "unknown flags": (with_(contract.PROFILE_HEADER, [8, 0, 0, 0, 0, 0]), contract.ERR_PROFILE_FLAGS),
    }


def test_the_sortformer_model_called_directly_refuses_bad_inputs_without_moving_state(tiny_server, audio) -> None:
    import tritonclient.grpc as grpcclient

    sf_io = contract.sortformer_io(LOW, 1)
    feature_names = [t.name for t in sf_io.inputs if t.name not in (contract.PROFILE, contract.PROFILE_HEADER)]
    no_profile = {contract.PROFILE: np.zeros((1, 1), np.float32),
                  contract.PROFILE_HEADER: np.zeros((1, contract.PROFILE_HEADER_LEN), np.int64)}
    outputs = [t.name for t in sf_io.outputs]
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    pre_id, victim, twin = new_sequence_id(), new_sequence_id(), new_sequence_id()
    plan = steps(LOW, audio["low"])
    try:
        for k, request in enumerate(plan):
            pre = _direct(client, contract.preprocessor_name(LOW), {
                contract.AUDIO: request.audio.reshape(1, -1),
                contract.AUDIO_LENGTH: np.array([[request.valid]], contract.AUDIO_LENGTH_TENSOR.dtype)},
                feature_names, pre_id, request.start, request.end)
            pre.update(no_profile)
            if k == 4:  # confirmed frames exist: state a bad request could spoil
                for name, (bad, bit) in _bad_features(pre).items():
                    out = _direct(client, contract.sortformer_name(LOW), bad, outputs, victim)
                    assert int(out[contract.FEATURE_ERROR][0, 0]) == bit, name
                    assert int(out[contract.N_CONFIRMED][0, 0]) == 0 and np.isfinite(out[contract.CONFIRMED]).all(), name
            got = _direct(client, contract.sortformer_name(LOW), pre, outputs, victim, request.start, request.end)
            want = _direct(client, contract.sortformer_name(LOW), pre, outputs, twin, request.start, request.end)
            for name in outputs:  # the state went on exactly as if the bad requests never came
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"request {k} {name}")
            assert int(got[contract.FEATURE_ERROR][0, 0]) == 0
    finally:
        client.close()


def test_the_postprocessor_refuses_a_flagged_step(tiny_server) -> None:
    """FEATURE_ERROR from the sortformer graph becomes a clear INVALID_ARGUMENT refusal."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    feeds = {}
    for t in contract.postprocessor_io().inputs:
        dims = [LOW.chunk_len if d == -1 and "CONFIRMED" in t.name else LOW.right_context if d == -1 else d
                for d in t.dims]
        feeds[t.name] = np.zeros([1, *dims], t.dtype)
    feeds[contract.FEATURE_ERROR][0, 0] = contract.ERR_FEATURES_NOT_FINITE | contract.ERR_LEFT_CONTEXT
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            _direct(client, contract.POSTPROCESSOR, feeds, [contract.SEGMENTS], new_sequence_id(), start=True)
        text = str(info.value.message())
        assert str(info.value.status()) == INVALID and "FEATURES hold NaN" in text and "LEFT_CONTEXT" in text, text
    finally:
        client.close()


# ---- 10. the largest sequence id the client accepts works on every protocol ------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "grpc-stream", "http"])
def test_the_largest_accepted_sequence_id_works_on_every_protocol(protocol, tiny_server) -> None:
    url = tiny_server.http_url if protocol == "http" else tiny_server.grpc_url
    with DiarizationClient(url, protocol=protocol, preset="ultra_low") as client:
        with client.open_stream(sequence_id=2 ** 63 - 1) as stream:
            stream.feed(np.zeros(ULTRA.step_samples * 2, np.float32))
            assert stream.close().finished
