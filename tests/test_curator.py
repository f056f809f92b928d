"""NeMo Curator stages backed by the Triton server (clients/curator).

Unit tests of ``clients.curator.core`` run in this venv (no Curator). The rest runs in the Curator side venv
(``clients.curator.env``; created once, ~2 min on a cold pip cache): a real Curator pipeline on a local Ray
cluster (2 CPUs) against the real tiny server must give exactly the speakers, durations, segments and
samples of ``diarize run`` + ``diarize split`` on the same files and preset; the diarization stage must give
the RTTM ``diarize run`` writes; a server that is down or a model that is not served must give a clear
error; a server that dies mid-batch must fail the task, not hang.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import soundfile

from clients.curator import core
from clients.diarize.split import SplitParams, separate
from clients.sortformer_client import Result, ServerUnavailable, parse_rttm, rttm_lines
from sortformer_triton.local_server import REPO_ROOT, free_port
from sortformer_triton.samples import conversation
from sortformer_triton.timeline import Segment

PRESET = "low"


# ---- unit: core (no Curator, no server) -----------------------------------------------------------
def _result(segments: List[Segment]) -> Result:
    return Result(sequence_id=1, preset=PRESET, n_samples=16000 * 12, probs=np.zeros((150, 4), np.float32),
                  segments=tuple(segments), requests=1, finished=True)


def _seg(start: float, end: float, speaker: int) -> Segment:
    return Segment(start=float(np.float32(start)), end=float(np.float32(end)), speaker=speaker, finalized=True)


def test_curator_segments_are_the_rttm_turns_in_curator_form() -> None:
    result = _result([_seg(2.48, 3.2, 1), _seg(0.08, 1.36, 0), _seg(0.96, 2.0, 1)])
    segs = core.curator_segments(result)
    assert segs == [{"start": 0.08, "end": 1.36, "speaker": "speaker_0"},
                    {"start": 0.96, "end": 2.0, "speaker": "speaker_1"},
                    {"start": 2.48, "end": 3.2, "speaker": "speaker_1"}]
    turns = parse_rttm("\n".join(rttm_lines("x", result.segments)))
    assert [(t.start, round(t.end, 3), t.speaker) for t in turns] == [(s["start"], s["end"], s["speaker"]) for s in segs]


def test_separate_speakers_is_diarize_split() -> None:
    rng = np.random.default_rng(3)
    wave = (rng.standard_normal(16000 * 12) * 0.1).astype(np.float32)
    result = _result([_seg(0.08, 3.36, 0), _seg(3.0, 6.0, 1), _seg(6.4, 9.6, 0), _seg(9.68, 11.5, 2)])
    for params in (SplitParams(), SplitParams(exclude_overlaps=False, min_duration=0.0)):
        tracks, n = core.separate_speakers(wave, 16000, result, params)
        ref, n_ref = separate(wave[:, None], 16000, core.result_turns(result), params)
        assert n == n_ref and [t.speaker for t in tracks] == [t.speaker for t in ref] and tracks
        for a, b in zip(tracks, ref):
            assert a.segments == b.segments and a.duration_s == b.duration_s
            np.testing.assert_array_equal(a.audio.reshape(-1), b.audio.reshape(-1))


class _FakeClient:
    """diarize() sleeps, counts concurrent calls, and fails for the recordings marked to fail."""

    def __init__(self, fail: set) -> None:
        self.fail, self.active, self.peak, self.lock = fail, 0, 0, threading.Lock()

    def diarize(self, samples: np.ndarray, rate: int, segment_params: Any = None) -> Result:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(0.05)
            if int(samples[0]) in self.fail:
                raise ServerUnavailable("h:1", "grpc", "connection reset")
            return _result([_seg(0.0, 1.0, int(samples[0]) % 4)])
        finally:
            with self.lock:
                self.active -= 1

    def diarize_offline(self, audios, sample_rate=16000, segment_params=None):
        assert sample_rate == 16000
        return [_result([_seg(0.0, 1.0, int(a[0]) % 4)]) for a in audios]


def test_diarize_many_runs_concurrently_and_reports_each_failure() -> None:
    client = _FakeClient(fail={2})
    audios = [(np.full(1600, k, np.float32), 16000) for k in range(6)] + [None]
    out = core.diarize_many(client, audios, PRESET, max_concurrency=3)
    assert client.peak == 3
    assert isinstance(out[2], ServerUnavailable) and out[6] is None
    assert [o.segments[0].speaker for k, o in enumerate(out[:6]) if k != 2] == [0, 1, 3, 0, 1]
    offline = core.diarize_many(client, audios[:3], core.OFFLINE)
    assert [o.segments[0].speaker for o in offline] == [0, 1, 2]


def test_options_are_refused_on_the_driver() -> None:
    for kwargs, word in [({"preset": "fast"}, "preset"), ({"protocol": "udp"}, "protocol"),
                         ({"timeout": 0}, "timeout"), ({"max_concurrency": 0}, "max_concurrency"),
                         ({"url": " "}, "url")]:
        options = dict(url="localhost:8001", protocol="grpc", preset=PRESET, timeout=5.0, max_concurrency=2)
        options.update(kwargs)
        with pytest.raises(ValueError, match=word):
            core.check_options(**options)


def test_connect_to_a_server_that_is_down_is_a_clear_error() -> None:
    url = f"127.0.0.1:{free_port()}"
    for preset in (PRESET, core.OFFLINE):
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match=f"{url}.*unavailable"):
            core.connect(url, "grpc", preset, timeout=5.0)
        assert time.monotonic() - t0 < 5


# ---- the Curator venv -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def curator_python() -> Path:
    from clients.curator.env import curator_python

    return curator_python()


def _run(python: Path, args: List[str], timeout: float = 240, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    from clients.curator.env import curator_env

    env = curator_env()
    env.pop("DIARIZE_URL", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return subprocess.run([os.fspath(python), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _main_venv(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.fspath(REPO_ROOT)
    env.pop("DIARIZE_URL", None)
    return subprocess.run([sys.executable, "-m", "clients.diarize", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 16 kHz mono PCM_16 conversations (2-4 speakers, 9-13 s)."""
    root = tmp_path_factory.mktemp("curator_audio") / "in"
    root.mkdir()
    for k, (seconds, speakers) in enumerate([(12.0, 3), (9.0, 2), (13.0, 4), (10.0, 2)]):
        audio, _ = conversation(seconds, n_speakers=speakers, seed=60 + k)
        soundfile.write(root / f"talk_{k}.wav", audio, 16000, subtype="PCM_16")
    return root


def _reference(url: str, conversations: Path, out: Path, *options: str) -> Dict[str, Any]:
    """``diarize run`` (with ``options``: the preset, or --offline) and ``diarize split`` on every file."""
    done = _main_venv("run", os.fspath(conversations), "--url", url, *options, "--out", os.fspath(out / "rttm"),
                      "--no-png", "--no-probs", "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    speakers: Dict[str, Any] = {}
    for wav in sorted(conversations.glob("*.wav")):
        done = _main_venv("split", os.fspath(wav), "--rttm", os.fspath(out / "rttm" / f"{wav.stem}.rttm"),
                          "--out", os.fspath(out / "split"))
        assert done.returncode == 0, done.stdout + done.stderr
        manifest = json.loads((out / "split" / f"{wav.stem}_speakers.json").read_text())
        for entry in manifest["speakers"]:
            speakers[f"{wav.stem}_{entry['speaker_id']}"] = entry
    return {"rttm": out / "rttm", "speakers": speakers}


@pytest.fixture(scope="module")
def reference(tiny_server, conversations: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    return _reference(tiny_server.grpc_url, conversations, tmp_path_factory.mktemp("curator_reference"),
                      "--preset", PRESET)


@pytest.fixture(scope="module")
def offline_reference(tiny_server, conversations: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same with the offline model, or None where the tiny repository has no ``diarizer_offline``."""
    from clients.sortformer_client import DiarizationClient, ModelUnavailable

    with DiarizationClient(tiny_server.grpc_url) as client:
        try:
            client.check_offline()
        except ModelUnavailable:
            return None
    return _reference(tiny_server.grpc_url, conversations, tmp_path_factory.mktemp("curator_offline"), "--offline")


def _check_speakers(got: Dict[str, Dict[str, Any]], ref: Dict[str, Any], waveform) -> None:
    """Curator's per-speaker fields (``got``, keyed <stem>_<speaker>) against ``diarize split``'s manifests."""
    assert len(ref) >= 3, f"the reference kept too few speakers to compare: {sorted(ref)}"
    assert sorted(got) == sorted(ref)
    for key, row in got.items():
        entry = ref[key]
        assert row["speaker_id"] == entry["speaker_id"] and row["num_speakers"] == entry["num_speakers"]
        assert round(row["duration"], 6) == entry["duration_sec"]
        assert [[round(s, 6), round(e, 6)] for s, e in row["diar_segments"]] == entry["segments"]
        assert row["sample_rate"] == 16000
        theirs, _ = soundfile.read(entry["audio_filepath"], dtype="float32")  # PCM_16 / 32768
        np.testing.assert_array_equal(waveform(key, row), theirs)


@pytest.mark.triton
def test_curator_pipeline_on_ray_equals_diarize_split(curator_python, tiny_server, conversations, reference,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "curator"
    t0 = time.monotonic()
    done = _run(curator_python, ["-m", "clients.curator", "separate", os.fspath(conversations), "--out", os.fspath(out),
                                 "--url", tiny_server.grpc_url, "--preset", PRESET, "--batch-size", "2",
                                 "--max-concurrency", "2", "--ray-cpus", "2", "--object-store-mb", "256"],
                cwd=tmp_path)  # not the checkout: the package comes from the venv (or PYTHONPATH without pyproject)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    seconds = time.monotonic() - t0
    rows = [json.loads(line) for line in (out / "speakers.jsonl").read_text().splitlines()]

    def waveform(key: str, row: Dict[str, Any]) -> np.ndarray:
        samples, rate = soundfile.read(row["speaker_audio_filepath"], dtype="float32")  # the tensor, float32
        assert rate == 16000
        return samples

    _check_speakers({f"{Path(r['audio_filepath']).stem}_{r['speaker_id']}": r for r in rows}, reference["speakers"],
                    waveform)
    print(f"curator pipeline (Ray start included): {seconds:.1f} s, {len(rows)} speaker tasks")


STAGE_CHECKS = r"""
import json, sys, soundfile
from pathlib import Path
from clients.curator import core
from clients.curator.stages import TritonSortformerDiarizationStage, TritonSpeakerSeparationStage
from clients.sortformer_client import ModelUnavailable, ServerUnavailable
from nemo_curator.tasks import AudioTask
from nemo_curator.tasks.sentinels import FailedTask

url, down, audio_dir, out_dir, offline = sys.argv[1:6]
out_dir = Path(out_dir)
files = sorted(Path(audio_dir).glob("*.wav"))
report = {}

# the diarization stage: one batch, concurrent sequences, RTTMs
def diarized(preset, rttm_dir):
    stage = TritonSortformerDiarizationStage(url=url, preset=preset, rttm_out_dir=str(rttm_dir), max_concurrency=4)
    stage.setup()
    tasks = [AudioTask(data={"audio_filepath": str(f)}, task_id=f"t{k}") for k, f in enumerate(files)]
    out = stage.process_batch(tasks)
    stage.teardown()
    return {Path(t.data["audio_filepath"]).stem: t.data["diar_segments"] for t in out}

report["diarized"] = diarized("low", out_dir / "rttm")
if offline == "1":  # the offline model: both stages, in one batch each
    report["diarized_offline"] = diarized("offline", out_dir / "rttm_offline")
    sep = TritonSpeakerSeparationStage(url=url, preset="offline", max_concurrency=4)
    sep.setup()
    children = sep.process_batch([AudioTask(data={"audio_filepath": str(f)}) for f in files])
    waves = {}
    rows = {}
    for t in children:
        key = Path(t.data["audio_filepath"]).stem + "_" + t.data["speaker_id"]
        waves[key] = t.data["waveform"].numpy()
        rows[key] = {k: v for k, v in t.data.items() if k != "waveform"}
    import numpy as np
    np.savez(out_dir / "offline_waves.npz", **waves)
    report["separated_offline"] = rows

# errors: server down, model not served (offline), a server that dies mid-batch
def error(make):
    try:
        make()
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
    return None

report["down"] = error(lambda: TritonSpeakerSeparationStage(url=down, preset="low", timeout=5).setup())
report["offline"] = error(lambda: TritonSpeakerSeparationStage(url=url, preset="offline").setup())  # None: served

class Dying:
    def diarize(self, samples, rate, segment_params=None):
        raise ServerUnavailable(url, "grpc", "Socket closed")
    def close(self):
        pass

sep = TritonSpeakerSeparationStage(url=url, preset="low")
sep._client = Dying()
report["mid_run"] = error(lambda: sep.process_batch([AudioTask(data={"audio_filepath": str(files[0])}, task_id="t9")]))
sep = TritonSpeakerSeparationStage(url=url, preset="low", on_error="fail")
sep._client = Dying()
report["mid_run_fail"] = [type(t).__name__ for t in sep.process_batch([AudioTask(data={"audio_filepath": str(files[0])})])]
print("REPORT" + json.dumps(report))
"""


@pytest.mark.triton
def test_stages_offline_and_errors(curator_python, tiny_server, conversations, reference, offline_reference,
                                   tmp_path: Path) -> None:
    """Without Ray: the diarization stage (streaming, and offline where the tiny repository serves it) gives
    the RTTMs ``diarize run`` writes; the separation stage with ``preset="offline"`` equals ``diarize run
    --offline`` + ``diarize split``; errors: server down, offline model missing, server dying mid-batch."""
    down = f"127.0.0.1:{free_port()}"
    served = offline_reference is not None
    done = _run(curator_python, ["-c", STAGE_CHECKS, tiny_server.grpc_url, down, os.fspath(conversations),
                                 os.fspath(tmp_path), "1" if served else "0"], timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    print(f"offline model served: {served}")
    checks = [("diarized", "rttm", reference)] + ([("diarized_offline", "rttm_offline", offline_reference)] if served else [])
    for field, folder, ref in checks:
        for wav in sorted(conversations.glob("*.wav")):
            ref_rttm = (ref["rttm"] / f"{wav.stem}.rttm").read_text()
            assert (tmp_path / folder / f"{wav.stem}.rttm").read_text() == ref_rttm
            assert report[field][wav.stem] == [{"start": t.start, "end": round(t.end, 3), "speaker": t.speaker}
                                               for t in parse_rttm(ref_rttm)]
    if served:
        waves = np.load(tmp_path / "offline_waves.npz")
        _check_speakers(report["separated_offline"], offline_reference["speakers"],
                        lambda key, row: waves[key].reshape(-1))
        assert report["offline"] is None
    else:
        assert report["offline"][0] == "ModelUnavailable" and "has no offline model" in report["offline"][1]
    assert report["down"][0] == "ServerUnavailable" and f"{down} (grpc) is unavailable" in report["down"][1]
    assert report["mid_run"][0] == "CuratorStageError"
    assert "task t9" in report["mid_run"][1] and "talk_0.wav" in report["mid_run"][1]
    assert "ServerUnavailable" in report["mid_run"][1] and "Socket closed" in report["mid_run"][1]
    assert report["mid_run_fail"] == ["FailedTask"]


def test_cli_with_the_server_down_fails_fast_before_ray(curator_python, tmp_path: Path, conversations) -> None:
    url = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    done = _run(curator_python, ["-m", "clients.curator", "separate", os.fspath(conversations), "--out",
                                 os.fspath(tmp_path), "--url", url, "--preset", PRESET, "--timeout", "5"], timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"Triton server at {url} (grpc) is unavailable" in done.stderr
    assert time.monotonic() - t0 < 60
