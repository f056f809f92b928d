"""Load-test tooling: perf_analyzer input data and runner, locust live-stream users, report helpers.

The server tests use the session's tiny model and local tritonserver (``tests/fixtures_models.py``:
``tiny_server``): a short perf_analyzer sequence run at concurrency 2, and a short headless locust run
of 2 paced live streams that must end with zero failures, also on the server's side.
"""
from __future__ import annotations

import base64
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from loadtest.common import parse_int_list, parse_presets, random_sequence_base
from loadtest.locust.run import percentile, run_locust, summarize
from loadtest.perf_analyzer import make_input_data as mid
from loadtest.perf_analyzer import run as pa_run
from sortformer_triton import contract
from sortformer_triton.presets import PRESETS, get_preset, requests_for
from sortformer_triton.protocol import iter_steps

LOW = get_preset("low")


# ---- input data (no server) ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_input_data_has_every_step_of_every_stream(tmp_path: Path, name: str) -> None:
    preset = PRESETS[name]
    streams, seconds = 3, 12.0
    path = mid.write_input_data(tmp_path, preset, streams=streams, seconds=seconds, seed=5)
    doc = json.loads(path.read_text())
    assert set(doc) == {"data"}  # no validation_data: perf_analyzer's last END may carry a later step
    assert len(doc["data"]) == streams
    expected = mid.expected_steps(preset, streams, seconds)
    assert [len(s) for s in doc["data"]] == expected
    for i, stream in enumerate(doc["data"]):
        audio = mid.stream_audio(i, seconds, seed=5)
        assert len(stream) == requests_for(preset, audio.size)
        want = list(iter_steps(preset, audio))
        for step, ref in zip(stream, want):
            assert set(step) == {contract.AUDIO, contract.AUDIO_LENGTH}
            assert step[contract.AUDIO]["shape"] == [preset.step_samples]
            got = np.frombuffer(base64.b64decode(step[contract.AUDIO]["b64"]), dtype="<f4")
            np.testing.assert_array_equal(got, ref.audio)
            assert step[contract.AUDIO_LENGTH] == {"content": [ref.valid], "shape": [1]}
        # the stream ends with the end-of-audio step and the flush steps (0 valid samples)
        valid = [s[contract.AUDIO_LENGTH]["content"][0] for s in stream]
        assert sum(valid) == audio.size
        assert valid[-1] == 0 or valid[-1] < preset.step_samples
    # streams are distinct conversations
    first = [s[0][contract.AUDIO]["b64"] for s in doc["data"]]
    assert len(set(first)) == streams


def test_input_data_json_list_encoding_matches_b64() -> None:
    a = mid.input_data(LOW, streams=1, seconds=2.0, encoding="content")
    b = mid.input_data(LOW, streams=1, seconds=2.0, encoding="b64")
    assert len(a["data"][0]) == len(b["data"][0]) == requests_for(LOW, mid.stream_samples(0, 2.0))
    for x, y in zip(a["data"][0], b["data"][0]):
        dec = np.frombuffer(base64.b64decode(y[contract.AUDIO]["b64"]), dtype="<f4")
        np.testing.assert_array_equal(np.asarray(x[contract.AUDIO]["content"], np.float32), dec)
    with pytest.raises(ValueError):
        mid.input_data(LOW, streams=0)


def test_input_data_cli_writes_one_file_per_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert mid.main(["--preset", "ultra_low,low", "--streams", "2", "--seconds", "3", "--out", str(tmp_path)]) == 0
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["diarizer_low_2x3s_seed0_b64.json", "diarizer_ultra_low_2x3s_seed0_b64.json"]
    assert "steps per stream" in capsys.readouterr().out


# ---- perf_analyzer runner pieces (no server) -------------------------------------------------------
def test_perf_analyzer_binary_and_private_libs() -> None:
    version = pa_run.check_binary()
    assert "2.51" in version
    for plain in pa_run.NEEDED_LIBS:
        link = pa_run.LIBS_DIR / plain
        assert link.is_symlink() and link.resolve().is_file()


def test_perf_analyzer_commands(tmp_path: Path) -> None:
    settings = pa_run.Settings(measurement_interval_ms=3000, stability_percentage=25)
    base = random_sequence_base(pa_run.id_block(4), pa_run.PA_SEQUENCE_ID_MIN, pa_run.PA_SEQUENCE_ID_MAX)
    assert pa_run.PA_SEQUENCE_ID_MIN <= base and base + pa_run.id_block(4) <= pa_run.PA_SEQUENCE_ID_MAX
    conc = pa_run.build_command(Path("pa"), "h:1", LOW, tmp_path / "d.json", "concurrency", 4,
                                tmp_path / "o.csv", settings, base)
    assert conc[conc.index("-m") + 1] == "diarizer_low"
    assert conc[conc.index("-i") + 1] == "grpc"
    assert conc[conc.index("--concurrency-range") + 1] == "4"
    assert f"--sequence-id-range={base}:{base + 1000}" in conc
    assert conc[conc.index("-s") + 1] == "25" and conc[conc.index("-p") + 1] == "3000"
    assert not any("valid" in a for a in conc)
    rate = pa_run.build_command(Path("pa"), "h:1", LOW, tmp_path / "d.json", "rate", 6, tmp_path / "o.csv",
                                settings, base)
    # live streams: 6 streams x one step per 0.48 s
    assert float(rate[rate.index("--request-rate-range") + 1]) == pytest.approx(6 / 0.48)
    assert rate[rate.index("--num-of-sequences") + 1] == "6"
    assert "--serial-sequences" in rate
    with pytest.raises(ValueError):
        pa_run.build_command(Path("pa"), "h:1", LOW, tmp_path, "bogus", 1, tmp_path / "o.csv", settings, base)


def test_small_helpers() -> None:
    assert parse_int_list("1,2,8") == [1, 2, 8]
    assert parse_int_list("2:8:3") == [2, 5, 8]
    with pytest.raises(ValueError):
        parse_int_list("0,1")
    assert [p.name for p in parse_presets(["very_high,low"])] == ["low", "very_high"]
    assert [p.name for p in parse_presets(["all"])] == list(PRESETS)
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([1.0, 2.0], 99) == 2.0
    assert math.isnan(percentile([], 50))


def test_locust_summary_verdict(tmp_path: Path) -> None:
    steps = tmp_path / "s.csv"
    rows = [
        # user, stream, sequence_id, index, kind, ready_s, sent_s, latency_ms, lateness_ms, ok, error
        (1, 1, 9, 0, "audio", 0.5, 0.5, 900.0, 0.0, 1, ""),  # warm-up: ignored
        (1, 1, 9, 1, "audio", 2.0, 2.0, 100.0, 1.0, 1, ""),
        (1, 1, 9, 2, "audio", 2.5, 2.5, 200.0, 2.0, 1, ""),
        (1, 1, 9, 3, "flush", 3.0, 3.1, 50.0, 0.0, 1, ""),
    ]
    with open(steps, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "stream", "sequence_id", "index", "kind", "ready_s", "sent_s", "latency_ms",
                    "lateness_ms", "ok", "error"])
        w.writerows(rows)
    s = summarize(steps, LOW, users=1, run_time_s=4, warmup_s=1.0)
    assert s.steps == 3 and s.failures == 0
    assert s.latency_p99_ms == 200.0 and s.lateness_max_ms == 2.0
    assert s.realtime  # 200 ms < 480 ms step
    slow = summarize(steps, get_preset("ultra_low"), users=1, run_time_s=4, warmup_s=0.0)
    assert not slow.realtime  # 900 ms > 240 ms step
    with open(steps, "a", newline="") as fh:
        csv.writer(fh).writerow([1, 1, 9, 4, "error", 3.5, 3.5, 5.0, 0.0, 0, "boom"])
    assert not summarize(steps, LOW, users=1, run_time_s=4, warmup_s=1.0).realtime


# ---- against the real local server -----------------------------------------------------------------
def _ensemble_failures(url: str) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(contract.ensemble_name(LOW), as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0]["inference_stats"].get("fail", {}).get("count", 0))


def test_perf_analyzer_short_sequence_run(tiny_server, tmp_path: Path) -> None:
    server = tiny_server
    failures_before = _ensemble_failures(server.grpc_url)
    code = pa_run.main(["--url", server.grpc_url, "--preset", "low", "--mode", "concurrency",
                        "--concurrency", "2", "-p", "2000", "-s", "50", "--seconds", "6", "--data-streams", "2",
                        "--timeout", "90", "--out", str(tmp_path)])
    assert code == 0, (tmp_path / "diarizer_low_concurrency_2.log").read_text()[-3000:]
    row = pa_run.read_csv_row(tmp_path / "diarizer_low_concurrency_2.csv")
    assert row is not None and row["Concurrency"] == "2"
    assert float(row["Inferences/Second"]) > 0 and int(row["p99 latency"]) > 0
    with open(tmp_path / "diarizer_low_concurrency.csv", newline="") as fh:
        merged = list(csv.DictReader(fh))
    assert [(r["Preset"], r["Level"], r["Status"]) for r in merged] == [("low", "2", "ok")]
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["machine"]["nproc"] >= 1 and meta["runs"][0]["returncode"] == 0
    assert _ensemble_failures(server.grpc_url) == failures_before


def test_locust_headless_two_live_streams(tiny_server, tmp_path: Path) -> None:
    server = tiny_server
    failures_before = _ensemble_failures(server.grpc_url)
    summary = run_locust(server.grpc_url, LOW, users=2, run_time_s=10, out_dir=tmp_path, audio_seconds=4,
                         warmup_s=0.0, quiet=True)
    log = (tmp_path / "low_u2.log").read_text()
    assert summary.returncode == 0, log[-3000:]
    assert summary.failures == 0 and summary.steps > 0, log[-3000:]
    assert summary.streams >= 2  # 4 s conversations: each user finished at least one stream
    assert (tmp_path / "low_u2.html").stat().st_size > 0
    with open(tmp_path / "low_u2_stats.csv", newline="") as fh:
        stats = {r["Name"]: r for r in csv.DictReader(fh)}
    assert int(stats["step low"]["Request Count"]) > 0
    assert stats["step low"]["Failure Count"] == "0"
    assert int(stats["lateness low"]["Request Count"]) > 0  # the custom metric
    rows = list(csv.DictReader(open(tmp_path / "low_u2_steps.csv", newline="")))
    kinds = {r["kind"] for r in rows}
    assert {"audio", "end"} <= kinds  # full streams ran, with their end-of-audio (and flush) steps
    assert all(float(r["lateness_ms"]) >= 0 for r in rows)
    # users stopped between requests and sent END: no request failed on the server either
    assert _ensemble_failures(server.grpc_url) == failures_before


# ---- report (no measuring) -------------------------------------------------------------------------
def _synthetic_report() -> dict:
    def run(users: int, p99: float, ok: bool) -> dict:
        return {"preset": "low", "users": users, "latency_p99_ms": p99, "lateness_p99_ms": 1.0,
                "realtime": ok}

    return {
        "label": "unit", "model": "tiny", "presets": ["low"], "command": "python -m loadtest.report",
        "machine": {"nproc": 2, "cpu_count": 2, "cpu_model": "cpu", "platform": "linux", "python": "3.11",
                    "date_utc": "2026-01-01 00:00 UTC"},
        "loadavg_start": 1.0, "loadavg_end": 1.0, "seconds": 60.0, "slots": 32, "parameters": 1000,
        "emb_dim": 64, "step_seconds": {"low": 0.48},
        "inprocess": [{"preset": "low", "concurrency": c, "steps_per_second": s, "step_ms_p50": m}
                      for c, s, m in ((1, 20.0, 50.0), (8, 24.0, 330.0))],
        "perf_analyzer": [{"preset": "low", "repository": r, "concurrency": c, "ok": True,
                           "infer_per_second": v, "p50_ms": m, "p99_ms": 2 * m}
                          for r, c, v, m in (("batching", 1, 16.0, 60.0), ("batching", 8, 20.0, 400.0),
                                             ("no_batching", 8, 10.0, 800.0))],
        "locust": [run(6, 200.0, True), run(8, 450.0, True), run(10, 900.0, False), run(9, 700.0, False)],
        "capacity": {"low": {"preset": "low", "sustained": 8, "first_failing": 9, "trials": [6, 8, 10, 9]}},
    }


def test_report_render_and_capacity_rules(tmp_path: Path) -> None:
    from loadtest import report as rep

    doc = _synthetic_report()
    path = tmp_path / "report.json"
    path.write_text(json.dumps(doc))
    assert rep.main(["--render", str(path)]) == 0
    out = json.loads(path.read_text())
    assert out["capacity"]["low"]["throughput_bound"] == 9  # floor(20 infer/s x 0.48 s)
    ratios = out["ratios"]["low"]
    assert ratios["overhead_throughput_c1"] == pytest.approx(20.0 / 16.0)
    assert ratios["overhead_throughput_c8"] == pytest.approx(24.0 / 20.0)
    assert ratios["batching_speedup_c8"] == pytest.approx(2.0)
    assert ratios["overhead_latency_ms_c1"] == pytest.approx(10.0)
    text = (tmp_path / "report.md").read_text()
    assert "| low | 480 ms | **8** | p99 step latency (paced) | 8: 450.0 ms" in text
    assert (tmp_path / "capacity.png").stat().st_size > 0 and (tmp_path / "throughput.png").stat().st_size > 0
    # the paced result never exceeds the throughput bound or the sequence slots
    assert rep.effective_capacity({"sustained": 12, "throughput_bound": 9, "slot_cap": 32,
                                   "first_failing": None}) == (9, "unpaced throughput x step")
    assert rep.effective_capacity({"sustained": 40, "throughput_bound": 0, "slot_cap": 32,
                                   "first_failing": None}) == (32, "sequence slots")


def test_perf_analyzer_offline_run(tiny_server, tmp_path: Path) -> None:
    """perf_analyzer against diarizer_offline (non-sequence, dynamic batching): a short run at concurrency 2."""
    from loadtest.perf_analyzer import offline as pa_offline

    doc = pa_offline.input_data(recordings=2, seconds=6)
    assert [r["AUDIO"]["shape"] for r in doc["data"]] == [[160000], [160000]]  # 6 s padded to the 10 s bucket
    code = pa_offline.main(["--url", tiny_server.grpc_url, "--concurrency", "2", "--recordings", "2", "--seconds", "6",
                            "-p", "2000", "-s", "50", "--timeout", "90", "--out", str(tmp_path)])
    assert code == 0, (tmp_path / "diarizer_offline_concurrency_2.log").read_text()[-3000:]
    row = pa_run.read_csv_row(tmp_path / "diarizer_offline_concurrency_2.csv")
    assert row is not None and row["Concurrency"] == "2" and float(row["Inferences/Second"]) > 0
    assert json.loads((tmp_path / "run.json").read_text())["runs"][0]["returncode"] == 0
