"""The offline Sortformer v1 (``diarizer_offline``): graph parity with NeMo, request rules, configs, the server.

Parity: the exported graph (a batch of recordings of different lengths, zero-padded, as Triton's dynamic
batcher hands them over) against NeMo's own ``SortformerEncLabelModel.forward`` on each recording alone, on
the same weights: calibrated and saturated (confident, trained-like) heads, <= 1e-4 on every frame.
"""
from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest

from clients.sortformer_client import DiarizationClient, DiarizationError, ModelUnavailable, read_rttm, rttm_lines
from sortformer_triton import contract, offline, repository
from sortformer_triton.presets import PRESETS, SAMPLE_RATE
from sortformer_triton.samples import conversation
from sortformer_triton.timeline import SegmentParams, segments_from_probs

try:  # the export side (torch, NeMo); the tests that need it take the fixtures that skip without it
    from export.offline import nemo_feature_sensitivity, nemo_forward, run_graph
except ImportError:  # pragma: no cover
    nemo_feature_sensitivity = nemo_forward = run_graph = None

TOL = 1e-4
LENGTHS_S = (7.3, 12.0, 3.1, 9.87)


def recordings(lengths=LENGTHS_S, seed: int = 40) -> List[np.ndarray]:
    return [conversation(s, n_speakers=2 + i % 3, seed=seed + i)[0] for i, s in enumerate(lengths)]


# ---- rules (no model) -------------------------------------------------------------------------------
def test_request_rules() -> None:
    cap = 10 * SAMPLE_RATE
    ok = np.zeros((1, cap), np.float32)
    assert offline.request_error(ok, np.array([[cap]]), cap) is None
    assert "at most 160000" in offline.request_error(np.zeros((1, cap + 1), np.float32), np.array([[10]]), cap)
    assert "between 1280" in offline.request_error(ok, np.array([[100]]), cap)
    assert "between 1280" in offline.request_error(ok, np.array([[cap + 1]]), cap)
    bad = ok.copy()
    bad[0, 5] = np.nan
    assert "NaN" in offline.request_error(bad, np.array([[cap]]), cap)
    loud = ok.copy()
    loud[0, 7] = 300.0
    assert "32768" in offline.request_error(loud, np.array([[cap]]), cap)
    loud_padding = ok.copy()
    loud_padding[0, -1] = 300.0  # past AUDIO_LENGTH: padding is not checked (the graph masks it)
    assert offline.request_error(loud_padding, np.array([[cap - 10]]), cap) is None
    assert "one value per recording" in offline.request_error(np.zeros((2, 2000), np.float32), np.array([[2000]]), cap)
    # a limit off the 5 s grid: a recording within it, padded to its bucket as a client pads, is admitted
    odd = offline.max_samples_for(62)
    inside = int(61.5 * SAMPLE_RATE)
    assert offline.padded_length(inside) > odd
    assert offline.request_error(np.zeros((1, offline.padded_length(inside)), np.float32), np.array([[inside]]),
                                 odd) is None
    assert "at most" in offline.request_error(np.zeros((1, offline.padded_length(inside)), np.float32),
                                              np.array([[odd + 1]]), odd)
    assert "at most" in offline.request_error(np.zeros((1, offline.padded_length(odd) + 1), np.float32),
                                              np.array([[inside]]), odd)
    assert offline.padded_length(1) == offline.BUCKET_SAMPLES
    assert offline.padded_length(offline.BUCKET_SAMPLES + 1) == 2 * offline.BUCKET_SAMPLES
    assert offline.max_samples_for(90) == 90 * SAMPLE_RATE
    with pytest.raises(ValueError, match="1..3600"):
        offline.max_samples_for(0.5)


def test_segments_batch_is_the_timeline_per_recording() -> None:
    rng = np.random.default_rng(3)
    probs = (rng.random((2, 50, 4)) > 0.6).astype(np.float32)
    probs[1, 30:] = 0.0
    rows, counts = offline.segments_batch(probs, np.array([[50], [30]]), SegmentParams())
    for i, n in enumerate((50, 30)):
        want = segments_from_probs(probs[i, :n], SegmentParams())
        got = [(float(a), float(b), int(s)) for a, b, s, f in rows[i, : counts[i, 0]]]
        assert got == [(pytest.approx(w.start, abs=1e-5), pytest.approx(w.end, abs=1e-5), w.speaker) for w in want]
        assert (rows[i, : counts[i, 0], 3] == 1.0).all()  # all finalized


@pytest.mark.parametrize("flavour", repository.FLAVOURS)
def test_offline_configs_validate_and_stay_out_unless_asked(flavour: str) -> None:
    plain = repository.model_configs(flavour, [PRESETS["low"]], 64)
    assert not set(offline.MODELS) & set(plain)
    configs = repository.model_configs(flavour, [PRESETS["low"]], 64, offline_max_samples=90 * SAMPLE_RATE)
    graph = configs[offline.SORTFORMER]
    assert graph.backend == ("python" if flavour == "local" else "onnxruntime")
    assert not graph.HasField("sequence_batching") and graph.HasField("dynamic_batching")
    assert configs[offline.ADMISSION].parameters[offline.MAX_SAMPLES_PARAMETER].string_value == str(90 * SAMPLE_RATE)
    steps = [s.model_name for s in configs[offline.ENSEMBLE].ensemble_scheduling.step]
    assert steps == [offline.ADMISSION, offline.SORTFORMER, offline.POSTPROCESSOR]
    # the graph reads the admitted length: a refused request never reaches it
    assert configs[offline.ENSEMBLE].ensemble_scheduling.step[1].input_map[contract.AUDIO_LENGTH] == \
        offline.ADMITTED_AUDIO_LENGTH


# ---- graph parity with NeMo ---------------------------------------------------------------------------
def test_exported_graph_equals_nemo_forward_per_recording(tiny_repository: Path,
                                                          tiny_offline_reference_model) -> None:
    """Batch of 4 recordings of different lengths, padded to one bucket, against NeMo on each alone."""
    audios = recordings()
    rows, preds, _ = run_graph(tiny_repository / "production" / offline.SORTFORMER / "1" / "model.onnx", audios)
    for audio, (got, n) in zip(audios, rows):
        want = nemo_forward(tiny_offline_reference_model, audio)
        assert n == want.shape[0] == offline.frames_of(audio.size)
        assert np.abs(got - want).max() <= TOL
        assert 0.05 < float((want > 0.5).mean()) < 0.95  # a calibrated head: speech and silence
    assert (preds[2, rows[2][1]:] == 0).all()  # zero past a short row's frames


def test_parity_cli_offline_family(capsys) -> None:
    """``python -m export.parity --offline``: calibrated and saturated heads, batch 1 and 4, all within 1e-4."""
    import json

    from export.parity import main

    assert main(["--offline", "--model", "tiny", "--batch", "1", "--batch", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(x["head"], x["batch"]) for x in lines] == [("calibrated", 1), ("calibrated", 4), ("saturated", 1),
                                                         ("saturated", 4)]
    assert all(x["pass"] for x in lines)
    assert all(x["max_abs"] <= TOL for x in lines if x["head"] == "calibrated")  # no steep head: 1e-4 flat


def test_saturated_model_graph_equals_nemo_and_nemo_batch_max_quirk(tmp_path: Path) -> None:
    """A confident (saturated) head, like a trained model's; and NeMo's batch-wide scaling measured: NeMo's own
    batched forward scales every row by the batch's max, so its result for a row depends on its neighbours;
    the graph scales each row by its own max (= NeMo on that recording alone)."""
    import torch

    from export.models import random_model
    from export.offline import export_offline

    model = random_model("tiny", seed=5, saturated=True, offline=True)
    path = export_offline(model, tmp_path / "model.onnx", "tiny", max_samples=30 * SAMPLE_RATE)
    audios = recordings((6.1, 11.0, 4.4), seed=70)
    audios[1] = audios[1] * 0.25  # a quiet recording next to louder ones
    rows, _, _ = run_graph(path, audios)
    saturated = 0.0
    for i, (audio, (got, _)) in enumerate(zip(audios, rows)):
        want = nemo_forward(model, audio)
        # a steep head amplifies NeMo's float32 feature rounding: allowed on top of 1e-4 (export.parity too)
        assert np.abs(got - want).max() <= TOL + nemo_feature_sensitivity(model, audio, seed=i)
        saturated = max(saturated, float(((want > 0.999) | (want < 0.001)).mean()))
    assert saturated > 0.7
    n = max(a.size for a in audios)
    batch = torch.zeros(len(audios), n)
    for i, a in enumerate(audios):
        batch[i, : a.size] = torch.from_numpy(a)
    with torch.no_grad():
        batched = model.forward(audio_signal=batch, audio_signal_length=torch.tensor([a.size for a in audios]))
    quiet = batched[1, : rows[1][1]].numpy()
    assert np.abs(quiet - rows[1][0]).max() > 10 * TOL  # NeMo batched differs for the quiet row


def test_offline_nemo_file_round_trip_and_family_checks(tmp_path: Path) -> None:
    """The .nemo path: a saved offline model loads back with the same weights; each family refuses the other."""
    import torch

    from export.models import SourceError, load_model, random_model

    model = random_model("tiny", seed=2, offline=True, calibrate=False)
    path = tmp_path / "v1.nemo"
    model.save_to(str(path))
    again = load_model(str(path), offline=True)
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
        assert torch.equal(a, b), name
    with pytest.raises(SourceError, match="--offline-model"):
        load_model(str(path))  # the streaming export refuses an offline model, naming the right option


# ---- the server -----------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_diarizes_concurrent_recordings_like_nemo(tiny_server, tiny_offline_reference_model,
                                                         protocol: str) -> None:
    audios = recordings()
    with DiarizationClient(tiny_server.grpc_url if protocol == "grpc" else tiny_server.http_url,
                           protocol=protocol) as client:
        client.check_offline()
        results = client.diarize_offline(audios, concurrency=4)
    defaults = SegmentParams(**{k: v for k, v in repository.POSTPROCESSOR_DEFAULTS.items()})
    for audio, result in zip(audios, results):
        want = nemo_forward(tiny_offline_reference_model, audio)
        assert result.preset == "offline" and result.finished and result.n_samples == audio.size
        assert result.probs.shape == want.shape
        assert np.abs(result.probs - want).max() <= TOL
        expected = segments_from_probs(result.probs, defaults)
        assert [(s.speaker, round(s.start, 4), round(s.end, 4)) for s in result.segments] == \
            [(s.speaker, round(s.start, 4), round(s.end, 4)) for s in expected]
        assert result.segments and all(s.finalized for s in result.segments)


NEMO_POSTPROCESSING = {"onset": 0.5, "offset": 0.5, "pad_onset": 0.0, "pad_offset": 0.0, "min_duration_on": 0.0,
                       "min_duration_off": 0.0}  # NeMo's PostProcessingParams defaults (diarize() without a YAML)


def test_server_equals_nemo_diarize(tiny_server, tiny_offline_reference_model, tmp_path: Path) -> None:
    """NeMo's own one-click ``diarize()`` on a file vs the server on the same samples, with NeMo's default
    post-processing sent as segment parameters: the same predictions (<= 1e-4) and the same segments, but for
    one NeMo quirk: a segment still open at the end of the file ends, in NeMo, at the *start* of its last 10 ms
    unit (``binarization`` closes it at index len - 1), here at the end of the last frame (0.01 s later)."""
    import soundfile

    audio = recordings((9.0,), seed=3)[0]
    path = tmp_path / "one.wav"
    soundfile.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    lines, tensors = tiny_offline_reference_model.diarize(audio=[str(path)], batch_size=1,
                                                          include_tensor_outputs=True, verbose=False)
    with DiarizationClient(tiny_server.grpc_url) as client:
        result = client.diarize_offline([audio], segment_params=NEMO_POSTPROCESSING)[0]
    assert np.abs(result.probs - tensors[0][0].numpy()).max() <= TOL
    end = result.n_frames * 0.08
    ours = sorted((round(s.start, 3), round(s.end - (0.01 if abs(s.end - end) < 1e-6 else 0.0), 3), s.speaker)
                  for s in result.segments)
    theirs = sorted((float(a), float(b), int(spk.split("_")[1])) for a, b, spk in (ln.split() for ln in lines[0]))
    assert len(theirs) > 5
    assert ours == theirs


def test_server_refuses_bad_recordings_and_serves_the_rest(tiny_server, tiny_export_info) -> None:
    """Too long, NaN, too short and bad segment parameters each get a clear error; the good recordings sent at
    the same time come back as if alone."""
    max_samples = int(tiny_export_info["offline"]["max_samples"])
    good = recordings((5.0, 8.0), seed=90)
    too_long = np.zeros(max_samples + SAMPLE_RATE, np.float32)
    nan = good[0].copy()
    nan[100] = np.nan
    with DiarizationClient(tiny_server.grpc_url) as client:
        alone = client.diarize_offline(good)

        def one(audio):
            try:
                return client.diarize_offline([audio])[0]
            except (DiarizationError, ValueError) as exc:
                return exc

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(one, [good[0], too_long, nan, good[1]]))
        with pytest.raises(ValueError, match="onset"):
            client.diarize_offline(good[:1], segment_params={"onset": 1.5})
        with pytest.raises(ValueError, match="at least 1280"):
            client.diarize_offline([np.zeros(100, np.float32)])
    assert isinstance(outcomes[1], DiarizationError) and "at most" in str(outcomes[1]) \
        and "diarizer_<preset>" in str(outcomes[1])
    assert isinstance(outcomes[2], ValueError) and "NaN" in str(outcomes[2])  # the client refuses it first
    for got, want in zip((outcomes[0], outcomes[3]), alone):
        assert np.array_equal(got.probs, want.probs) and got.segments == want.segments


def test_server_refuses_what_a_raw_client_sends(tiny_server) -> None:
    """Requests the client library would never send, straight through tritonclient: each refused by
    offline_admission with INVALID_ARGUMENT and its reason."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)

    def infer(audio: np.ndarray, length: int) -> str:
        tensors = [grpcclient.InferInput(contract.AUDIO, list(audio.shape), "FP32"),
                   grpcclient.InferInput(contract.AUDIO_LENGTH, [audio.shape[0], 1], "INT64")]
        tensors[0].set_data_from_numpy(audio)
        tensors[1].set_data_from_numpy(np.full((audio.shape[0], 1), length, np.int64))
        try:
            client.infer(offline.ENSEMBLE, tensors)
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc
            return exc.message()
        return ""

    nan = np.zeros((1, 20000), np.float32)
    nan[0, 10] = np.nan
    assert "NaN" in infer(nan, 20000)
    assert "32768" in infer(np.full((1, 20000), 2000.0, np.float32), 20000)
    assert "between 1280" in infer(np.zeros((1, 20000), np.float32), 30000)
    assert infer(np.zeros((2, 20000), np.float32), 20000) == ""  # a client-side batch of 2 is served
    huge = 600 * SAMPLE_RATE  # 38 MB: refused by admission before the graph, and the server goes on
    assert "at most" in infer(np.zeros((1, huge), np.float32), huge)
    assert infer(np.zeros((1, 20000), np.float32), 20000) == ""
    client.close()


def test_segment_parameters_reach_the_offline_postprocessor(tiny_server) -> None:
    audio = recordings((9.0,), seed=95)
    params = {"onset": 0.7, "offset": 0.3, "min_duration_on": 0.0, "min_duration_off": 0.0}
    with DiarizationClient(tiny_server.grpc_url) as client:
        result = client.diarize_offline(audio, segment_params=params)[0]
    want = segments_from_probs(result.probs, SegmentParams(**{**repository.POSTPROCESSOR_DEFAULTS, **params}))
    assert [(s.speaker, round(s.start, 4)) for s in result.segments] == [(s.speaker, round(s.start, 4)) for s in want]


def test_a_server_without_the_offline_model_says_so(tiny_repository, tiny_export_info, tmp_path, triton_server):
    from tests.fixtures_models import preset_repository

    repo = preset_repository(tiny_repository, tmp_path, [PRESETS["ultra_low"]], int(tiny_export_info["emb_dim"]), 60)
    server = triton_server(repo)
    with DiarizationClient(server.grpc_url) as client:
        with pytest.raises(ModelUnavailable, match="--offline-model"):
            client.check_offline()


def test_cli_offline_writes_what_the_library_returns(tiny_server, tmp_path: Path) -> None:
    import soundfile

    from tests.test_cli import diarize

    audios = recordings((6.0, 10.5), seed=99)
    (tmp_path / "in").mkdir()
    for i, a in enumerate(audios):
        soundfile.write(tmp_path / "in" / f"rec{i}.wav", a, SAMPLE_RATE, subtype="FLOAT")
    done = diarize(str(tmp_path / "in"), "--offline", "--url", tiny_server.grpc_url, "--out", str(tmp_path / "out"),
                   "--no-png", "--no-progress")
    assert done.returncode == 0, done.stderr
    with DiarizationClient(tiny_server.grpc_url) as client:
        results = client.diarize_offline(audios)
    for i, result in enumerate(results):
        assert result.segments
        written = (tmp_path / "out" / f"rec{i}.rttm").read_text().splitlines()
        assert written == rttm_lines(f"rec{i}", result.segments)
        assert len(read_rttm(tmp_path / "out" / f"rec{i}.rttm")) == len(result.segments)
    refused = diarize(str(tmp_path / "in"), "--offline", "--enroll", f"a={tmp_path / 'in' / 'rec0.wav'}",
                      "--url", tiny_server.grpc_url)
    assert refused.returncode == 2 and "do not apply to --offline" in refused.stderr + refused.stdout
    assert os.path.isdir(tmp_path / "out")


def test_repository_cli_knows_the_offline_models(tmp_path: Path, capsys) -> None:
    """``python -m sortformer_triton.repository --check`` of a tree exported with --offline-model: up to date with
    --offline-max-seconds, stale offline dirs without it."""
    from sortformer_triton.repository import main

    args = ["--root", str(tmp_path), "--preset", "low", "--emb-dim", "64"]
    assert main(["--write", *args, "--offline-max-seconds", "90"]) == 0
    assert (tmp_path / "production" / offline.ENSEMBLE / "config.pbtxt").is_file()
    assert main(["--check", *args, "--offline-max-seconds", "90"]) == 0
    capsys.readouterr()
    assert main(["--check", *args]) == 1
    assert f"stale model dir {tmp_path / 'local' / offline.ENSEMBLE}" in capsys.readouterr().err
    assert main(["--check", *args, "--offline-max-seconds", "60"]) == 1  # another limit: the admission config differs
