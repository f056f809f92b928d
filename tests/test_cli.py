"""The ``diarize`` CLI in subprocesses (``python -m clients.diarize``) against the real tiny server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import soundfile

from clients.sortformer_client import read_rttm, resampled_length
from sortformer_triton.local_server import REPO_ROOT, free_port
from sortformer_triton.protocol import expected_frames
from sortformer_triton.samples import conversation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def diarize(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "200"  # rich: wide tables in a pipe
    env.pop("DIARIZE_URL", None)
    return subprocess.run([sys.executable, "-m", "clients.diarize", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wav_files(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """Two wavs: 16 kHz mono PCM_16 (11 s, 3 speakers) and 22.05 kHz stereo float (8 s, 2 speakers)."""
    root = tmp_path_factory.mktemp("cli_audio")
    (root / "in").mkdir()
    a, turns_a = conversation(11.0, n_speakers=3, seed=21)
    b, _ = conversation(8.0, n_speakers=2, seed=22)
    path_a = root / "in" / "meeting one.wav"
    path_b = root / "in" / "call.wav"
    soundfile.write(path_a, a, 16000, subtype="PCM_16")
    import soxr

    b22 = soxr.resample(b, 16000, 22050).astype(np.float32)
    soundfile.write(path_b, np.stack([b22, 0.8 * b22], axis=1), 22050, subtype="FLOAT")
    ref = root / "ref"
    ref.mkdir()
    with open(ref / "meeting_one.rttm", "w") as fh:
        for t in turns_a:
            fh.write(f"SPEAKER meeting_one 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> s{t.speaker} <NA> <NA>\n")
    return {"root": root, "dir": root / "in", "a": path_a, "b": path_b, "ref": ref,
            "samples": {"meeting_one": a.size, "call": b22.size}, "rates": {"meeting_one": 16000, "call": 22050}}


def _check_outputs(out: Path, wav_files: Dict[str, Any], preset: str) -> None:
    for uri in ("meeting_one", "call"):
        rttm, js, png = out / f"{uri}.rttm", out / f"{uri}.json", out / f"{uri}.png"
        assert rttm.is_file() and js.is_file() and png.is_file(), f"outputs of {uri} missing in {out}"
        assert png.read_bytes()[:8] == PNG_MAGIC
        data = json.loads(js.read_text())
        n16 = resampled_length(wav_files["samples"][uri], wav_files["rates"][uri])
        assert data["uri"] == uri and data["preset"] == preset and data["finished"] is True
        assert data["n_frames"] == expected_frames(n16) == len(data["probabilities"])
        assert data["audio"]["sample_rate"] == wav_files["rates"][uri]
        probs = np.array(data["probabilities"])
        assert probs.shape == (data["n_frames"], 4) and (probs >= 0).all() and (probs <= 1).all()
        turns = read_rttm(rttm)
        lines = rttm.read_text().splitlines()
        assert all(len(line.split()) == 10 and line.startswith(f"SPEAKER {uri} 1 ") for line in lines)
        assert [(t.speaker, round(t.start, 3), round(t.duration, 3)) for t in turns] == [
            (s["label"], round(s["start"], 3), round(s["duration"], 3))
            for s in sorted(data["segments"], key=lambda s: (s["start"], s["speaker"], s["end"]))]
        assert all(t.speaker.startswith("speaker_") for t in turns)
        assert all(t.end <= data["duration_s"] + 0.08 + 1e-6 for t in turns)


@pytest.mark.parametrize("protocol", ["grpc", "grpc-stream", "http"])
def test_run_writes_rttm_json_png_per_file(protocol: str, tiny_server, wav_files, tmp_path: Path) -> None:
    url = tiny_server.http_url if protocol == "http" else tiny_server.grpc_url
    out = tmp_path / "out"
    proc = diarize(str(wav_files["dir"]), "--url", url, "--protocol", protocol, "--preset", "low",
                   "--out", str(out), "--concurrency", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_outputs(out, wav_files, "low")
    assert "meeting one.wav" in proc.stdout and "call.wav" in proc.stdout  # the summary table
    assert "steps" in proc.stderr  # the progress bars


def test_run_options_and_explicit_files(tiny_server, wav_files, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = diarize("run", str(wav_files["a"]), str(wav_files["b"]), "--url", f"grpc://{tiny_server.grpc_url}",
                   "--preset", "ultra_low", "--out", str(out), "--no-png", "--no-probs", "--no-progress",
                   "--min-duration-on", "0.6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "meeting_one.json").read_text())
    assert "probabilities" not in data and data["segment_params"] == {"min_duration_on": 0.6}
    assert all(s["duration"] >= 0.6 - 1e-6 for s in data["segments"])
    assert not (out / "meeting_one.png").exists() and "steps" not in proc.stderr


def test_eval_and_split_on_the_run_outputs(tiny_server, wav_files, tmp_path: Path) -> None:
    hyp = tmp_path / "hyp"
    proc = diarize(str(wav_files["a"]), "--url", tiny_server.grpc_url, "--out", str(hyp), "--no-png")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = tmp_path / "scores.json"
    proc = diarize("eval", "--ref", str(wav_files["ref"]), "--hyp", str(hyp), "--collar", "0.25",
                   "--json", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DER" in proc.stdout and "JER" in proc.stdout and "meeting_one" in proc.stdout and "TOTAL" in proc.stdout
    scores = json.loads(report.read_text())
    assert scores["collar"] == 0.25 and [f["uri"] for f in scores["files"]] == ["meeting_one"]
    total = scores["total"]
    assert 0.0 <= total["der"] and 0.0 <= total["jer"] <= 1.0 and total["scored_s"] > 5.0
    assert f"{100 * total['der']:.2f}" in proc.stdout
    proc = diarize("eval", "--ref", str(wav_files["ref"]), "--hyp", str(hyp), "--skip-overlap")
    assert proc.returncode == 0 and "overlap skipped" in proc.stdout

    split_out = tmp_path / "split"
    proc = diarize("split", str(wav_files["a"]), "--rttm", str(wav_files["ref"] / "meeting_one.rttm"),
                   "--out", str(split_out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wavs = sorted(split_out.glob("meeting_one_*.wav"))
    manifest = json.loads((split_out / "meeting_one_speakers.json").read_text())
    assert wavs and [Path(e["audio_filepath"]).name for e in manifest["speakers"]] == [w.name for w in wavs]
    source = soundfile.info(wav_files["a"])
    for w in wavs:
        info = soundfile.info(w)
        assert (info.frames, info.samplerate, info.channels) == (source.frames, 16000, 1)


def test_live_mode_with_a_wav_file_as_microphone(tiny_server, wav_files, tmp_path: Path) -> None:
    out = tmp_path / "live"
    proc = diarize("live", "--input-wav", str(wav_files["b"]), "--no-pace", "--url", tiny_server.grpc_url,
                   "--protocol", "grpc-stream", "--preset", "ultra_low", "--out", str(out), "--name", "call")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "call.json").read_text())
    assert data["finished"] and data["n_frames"] == expected_frames(resampled_length(
        wav_files["samples"]["call"], 22050))
    printed = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert [(float(a), float(b), c) for a, b, c in printed] == [
        (round(s["start"], 2), round(s["end"], 2), s["label"]) for s in data["segments"]]


def test_errors_exit_2_with_a_clear_message(wav_files, tmp_path: Path) -> None:
    url = f"127.0.0.1:{free_port()}"
    proc = diarize(str(wav_files["a"]), "--url", url, "--out", str(tmp_path / "o"), "--timeout", "5")
    assert proc.returncode == 2 and url in proc.stderr and "unavailable" in proc.stderr
    proc = diarize(str(tmp_path / "missing.wav"), "--url", url)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = diarize("eval", "--ref", str(tmp_path / "nope"), "--hyp", str(tmp_path))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = diarize(str(wav_files["a"]), "--protocol", "carrier-pigeon")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["eval"], ["split"], ["live"]])
def test_help(command: List[str]) -> None:
    proc = diarize(*command, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: diarize")
    if not command:
        assert all(f"diarize {c}" in proc.stdout for c in ("eval", "split", "live"))
