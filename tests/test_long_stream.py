"""``loadtest.long_stream``: the long-stream benchmark tool (bounded step time and memory of one stream).

The tool is tested, never a timing: its pieces without a server (lazy synthetic audio, process-tree
memory, markdown sections, Triton statistics arithmetic), and one short run (1.5 min of audio at
``high``, ~10 requests) against the session's tiny-model tritonserver, whose figures must be complete
and consistent: every frame confirmed, the server's process tree found, markdown, plot and CSVs written.
The real runs (2 h ``very_high``, 30 min ``low``, full-size model) are benchmarks: docs/long_streams.md.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from loadtest import long_stream as ls
from sortformer_triton.presets import SAMPLE_RATE, get_preset, requests_for
from sortformer_triton.protocol import expected_frames
from sortformer_triton.samples import conversation


# ---- pieces (no server) ------------------------------------------------------------------------------
def test_synthetic_audio_is_lazy_exact_and_deterministic() -> None:
    total = int(2.5 * SAMPLE_RATE) + 7
    audio = ls.SyntheticLongAudio(total, piece_seconds=1.0, seed=3)
    assert audio.n_pieces == 3
    pieces = audio.pieces()
    first = next(pieces)
    assert audio.pieces_made == 1  # made on demand, one piece at a time
    np.testing.assert_array_equal(first, conversation(1.0, n_speakers=4, seed=3)[0])
    rest = list(pieces)
    assert [p.size for p in [first, *rest]] == [SAMPLE_RATE, SAMPLE_RATE, SAMPLE_RATE // 2 + 7]
    assert audio.synthesis_s > 0
    step = get_preset("low").step_samples
    slices = list(ls.SyntheticLongAudio(total, piece_seconds=1.0, seed=3).slices(step))
    assert sum(s.size for s in slices) == total and max(s.size for s in slices) <= step
    np.testing.assert_array_equal(np.concatenate(slices), np.concatenate([first, *rest]))
    with pytest.raises(ValueError):
        ls.SyntheticLongAudio(0)


def test_process_tree_memory_finds_children() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        tree = ls.process_tree(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
        mem = ls.tree_memory(os.getpid(), {})
        assert {m.pid for m in mem} >= {os.getpid(), child.pid}
        assert all(m.rss_kb > 0 for m in mem if m.pid == os.getpid())
        assert [m.label for m in mem if m.pid == child.pid] == ["sleep"]
    finally:
        child.kill()
        child.wait()
    sample = ls.MemoryProbe(None).sample(0, 0.0, 0.0)
    assert math.isnan(sample.server_rss_mb) and sample.client_rss_mb > 0 and sample.processes == {}


def test_cpu_meter_counts_a_process_from_when_it_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process found by ``refresh`` adds only the CPU it spends afterwards (not its whole lifetime); one
    that ended stops counting (no negative step)."""
    tree, cpu = [1], {1: 10.0, 2: 500.0}

    def cpu_seconds(pid: int) -> float:
        if pid not in cpu:
            raise OSError(f"no process {pid}")
        return cpu[pid]

    monkeypatch.setattr(ls, "process_tree", lambda root: list(tree))
    monkeypatch.setattr(ls, "cpu_seconds", cpu_seconds)
    meter = ls.CpuMeter(1)
    cpu[1] = 10.5
    assert meter.delta_ms() == pytest.approx(500.0)
    tree.append(2)
    meter.refresh()
    cpu[1], cpu[2] = 11.0, 500.25
    assert meter.delta_ms() == pytest.approx(750.0)
    tree.remove(2)
    del cpu[2]
    cpu[1] = 11.1
    assert meter.delta_ms() == pytest.approx(100.0)
    assert math.isnan(ls.CpuMeter(None).delta_ms())


def test_warmup_covers_the_filling_of_speaker_cache_and_fifo() -> None:
    low, very_high = get_preset("low"), get_preset("very_high")
    assert ls.warmup_requests(low) * low.chunk_len >= low.spkcache_len + low.fifo_len + low.right_context
    assert ls.warmup_requests(very_high) == 3
    assert ls.warmup_requests(very_high, minimum=10) == 10


def test_markdown_section_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    doc = tmp_path / "long.md"
    doc.write_text("# Long streams\n\nhand-written text\n")
    ls.update_markdown(doc, "low", "first run")
    ls.update_markdown(doc, "very_high", "other preset")
    ls.update_markdown(doc, "low", "second run")
    text = doc.read_text()
    assert "hand-written text" in text and "other preset" in text and "second run" in text
    assert "first run" not in text and text.count("<!-- BEGIN long_stream:low -->") == 1


def test_stats_between_means_per_execution() -> None:
    a = {"m": {k: (2, 2_000_000) for k in ls.STAT_KINDS}}
    b = {"m": {k: (6, 10_000_000) for k in ls.STAT_KINDS}, "idle": {k: (0, 0) for k in ls.STAT_KINDS}}
    out = ls.stats_between(a, b)
    assert set(out) == {"m"} and out["m"]["count"] == 4 and out["m"]["compute_infer_ms"] == pytest.approx(2.0)
    assert ls.stats_between(None, b) == {}


# ---- one short run against the real local server ----------------------------------------------------
def test_short_long_stream_run_figures_are_complete(tiny_server, tmp_path: Path) -> None:
    server = tiny_server
    minutes = 1.5
    out, md, png = tmp_path / "run", tmp_path / "long_streams.md", tmp_path / "long_streams_high.png"
    code = ls.main(["--url", server.grpc_url, "--server-pid", str(server.pid), "--preset", "high",
                    "--minutes", str(minutes), "--out", str(out), "--markdown", str(md), "--plot", str(png),
                    "--no-progress"])
    assert code == 0
    doc = json.loads((out / "summary.json").read_text())
    s = doc["summary"]
    preset = get_preset("high")
    samples = int(minutes * 60 * SAMPLE_RATE)
    # the stream really ended: every frame confirmed, FINISHED, segments inside the stream
    assert s["frames"] == {"confirmed": expected_frames(samples), "expected": expected_frames(samples),
                           "all_confirmed": True, "finished_flag": True}
    assert not s["interrupted"]
    assert s["requests"]["answered"] == s["requests"]["expected"] == requests_for(preset, samples)
    assert s["segments"]["within_stream"] and s["segments"]["finalized"] == s["client_result"]["segments"]
    assert s["client_result"]["probs_shape"] == [expected_frames(samples), 4]
    # step-time figures present and ordered
    st = s["step_ms"]
    assert 0 < st["min"] <= st["p50"] <= st["p95"] <= st["max"]
    assert st["first10_median"] > 0 and st["last10_median"] > 0 and st["ratio_last_first"] > 0
    # memory: the server's tree was found (tritonserver + the Python-backend stubs), the client measured
    procs = s["per_process_rss_mb"]
    assert any(k.startswith("tritonserver") for k in procs)
    assert any(k.startswith("stub:sortformer_high") for k in procs)
    assert any(k.startswith("stub:postprocessor") for k in procs)
    for key in ("server_rss_mb", "client_rss_mb"):
        assert 0 < s[key]["start"] <= s[key]["max"] and s[key]["end"] > 0
        assert math.isfinite(s[key]["growth"])
    assert s["rss_start"]["request"] == s["requests"]["warmup"]
    # time, load, Triton's own statistics
    assert s["time"]["rtf_steps"] > 0 and s["time"]["wall_s"] >= s["time"]["steps_s"]
    assert s["loadavg"]["max"] >= 0
    assert s["server_stats"]["after_warmup"]["sortformer_high"]["count"] >= 1
    # outputs
    with open(out / "steps.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == s["requests"]["answered"] and {r["kind"] for r in rows} == {"audio", "tail"}
    with open(out / "rss.csv", newline="") as fh:
        tags = [r["tag"] for r in csv.DictReader(fh)]
    assert tags[0] == "idle" and "warmup" in tags and tags[-1] == "end"
    text = md.read_text()
    assert "<!-- BEGIN long_stream:high -->" in text and "every frame confirmed | **yes**" in text
    assert "long_streams_high.png" in text
    assert png.stat().st_size > 0 and (out / "plot.png").stat().st_size > 0
    # --render redoes plot and markdown from the run's files, measuring nothing
    md2 = tmp_path / "again.md"
    assert ls.main(["--render", str(out), "--markdown", str(md2)]) == 0
    again = md2.read_text()
    assert "<!-- BEGIN long_stream:high -->" in again and "every frame confirmed | **yes**" in again


class _InterruptOnce(ls.MemoryProbe):
    """Raises KeyboardInterrupt (as Ctrl-C would) at the first sample from request ``at`` on."""

    def __init__(self, server_pid: int, at: int) -> None:
        super().__init__(server_pid)
        self.at, self.fired = at, False

    def sample(self, request: int, stream_s: float, wall_s: float, tag: str = "") -> ls.RssSample:
        if request >= self.at and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return super().sample(request, stream_s, wall_s, tag)


def test_interrupted_run_ends_the_sequence_and_keeps_its_figures(tiny_server) -> None:
    server = tiny_server
    run = ls.run_stream(server.grpc_url, get_preset("high"), 1.5, _InterruptOnce(server.pid, at=3), rss_every=1,
                        progress=False)
    assert run["interrupted"] and len(run["steps"]) == 3
    s = ls.summarize(run)
    assert s["interrupted"] and not s["frames"]["all_confirmed"] and not s["frames"]["finished_flag"]
    assert s["audio_s"] == pytest.approx(3 * get_preset("high").step_seconds)
    assert s["frames"]["confirmed"] < s["frames"]["expected"]
    assert "**Interrupted**" in ls.markdown({"summary": s, "machine": _machine(), "command": "x", "server": "s",
                                             "model": {}}, None)
    # the server keeps serving: a new stream right after runs to its end
    again = ls.run_stream(server.grpc_url, get_preset("high"), 0.5, ls.MemoryProbe(None), progress=False)
    assert not again["interrupted"] and again["result"].finished


def _machine() -> dict:
    return {"nproc": 2, "cpu_count": 2, "cpu_model": "cpu", "platform": "linux", "python": "3.11",
            "date_utc": "2026-01-01 00:00 UTC"}
