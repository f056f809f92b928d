"""Abandoned streams, overload and restarts against real tritonservers (issue 7, items 3, 4 and 5).

The tiny model's repository is regenerated with a 2-second sequence idle timeout (so abandoned streams
are reaped while the test watches) and served twice:

- ``roomy``: 64 sequence slots, for 1000 short sequences of which every fourth is abandoned without
  END (a client that vanished): Triton's idle timeout frees the slot, the Python models drop the
  state (their TTL), and the server's RSS stays flat (measured, printed, bounded);
- ``tight``: 2 sequence slots, for more concurrent streams than slots: they queue (no deadlock) and
  end with their solo results; a START that waits longer than the client's timeout gets a clear
  ``RequestTimeout``, and the client's retry with backoff gets through once a slot frees;

plus a server killed mid-stream (the client reports ``ServerUnavailable`` naming the URL; a restarted
server on the same ports serves new streams correctly, and a client retrying its START rides out the
restart), and a killed server's whole process group reaped by ``stop`` (a hung Python stub included: an
orphaned ``triton_python_backend_stub`` once outlived the test suite).
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from clients.sortformer_client import (
    NO_RETRY,
    DiarizationClient,
    RequestTimeout,
    RetryPolicy,
    ServerUnavailable,
    new_sequence_id,
)
from loadtest.long_stream import tree_memory
from sortformer_triton.local_server import LocalTritonServer, process_group_members
from sortformer_triton.presets import get_preset
from sortformer_triton.samples import conversation
from tests.fixtures_models import preset_repository
from tests.rawseq import RawSequence, steps

IDLE_SECONDS = 2
TIGHT_IDLE_SECONDS = 30
PRESETS = [get_preset("ultra_low"), get_preset("low")]
SHORT = get_preset("ultra_low")
LOW = get_preset("low")


def _repository(tiny_repository: Path, dest: Path, emb_dim: int, idle_seconds: int = IDLE_SECONDS,
                **options) -> Path:
    """The tiny model's local repository, two presets, configs regenerated with ``options``."""
    return preset_repository(tiny_repository, dest, PRESETS, emb_dim, idle_seconds, **options)


@pytest.fixture(scope="module")
def roomy(tiny_repository, tiny_export_info, tmp_path_factory, triton_server) -> LocalTritonServer:
    repo = _repository(tiny_repository, tmp_path_factory.mktemp("roomy"), int(tiny_export_info["emb_dim"]),
                       max_batch_size=8, max_candidate_sequences=64)
    return triton_server(repo)


@pytest.fixture(scope="module")
def tight(tiny_repository, tiny_export_info, tmp_path_factory, triton_server) -> LocalTritonServer:
    # the idle timeout must outlast the longest wait in the backlog: Triton counts a waiting START's
    # time as idle and reaps the sequence right after that START runs (see test_backlog_wait_...)
    repo = _repository(tiny_repository, tmp_path_factory.mktemp("tight"), int(tiny_export_info["emb_dim"]),
                       idle_seconds=TIGHT_IDLE_SECONDS, max_batch_size=2, max_candidate_sequences=2)
    return triton_server(repo)


def server_rss_mb(pid: int) -> float:
    """Resident memory of tritonserver and its Python-backend stubs (its process tree), MB."""
    return sum(m.rss_kb for m in tree_memory(pid, {})) / 1024


def _short_audio(k: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    return (0.1 * rng.standard_normal(int(16000 * (0.4 + 0.3 * (k % 3))))).astype(np.float32)


def _dropped(log: Path) -> Dict[str, int]:
    """Sequences each Python model reported dropping after its TTL (from the server log)."""
    counts: Dict[str, int] = {"stateful": 0, "postprocessor": 0}
    for line in log.read_text(errors="replace").splitlines():
        match = re.search(r"dropped (?:the state of )?(\d+) sequence\(s\) idle", line)
        if match:
            counts["postprocessor" if "postprocessor" in line else "stateful"] += int(match.group(1))
    return counts


# ---- 3. abandoned streams -----------------------------------------------------------------------
def test_abandoned_stream_is_released_by_idle_timeout_and_ttl(roomy) -> None:
    url = roomy.grpc_url
    before = _dropped(roomy.log_path)
    plan = steps(SHORT, conversation(3.0, n_speakers=2, seed=5)[0])
    vanished = RawSequence(url, SHORT, new_sequence_id())
    for request in plan[:3]:
        assert vanished.step(request).error == ""
    vanished.close()  # the client is gone: no END, ever
    time.sleep(IDLE_SECONDS + 1.5)
    # another stream's request makes the Python models look at their TTLs
    with DiarizationClient(url, preset=SHORT) as client:
        assert client.diarize(_short_audio(1)).finished
    # Triton ended the sequence: continuing it needs a new START
    again = RawSequence(url, SHORT, vanished.sequence_id)
    try:
        reply = again.send(plan[3].audio, plan[3].valid)
        assert reply.outputs is None and "START" in reply.error
    finally:
        again.close()
    after = _dropped(roomy.log_path)
    # the preprocessor and sortformer models (stateful) and the postprocessor dropped their state
    assert after["stateful"] - before["stateful"] >= 2 and after["postprocessor"] - before["postprocessor"] >= 1


def test_rss_stays_flat_over_1000_short_sequences(roomy) -> None:
    url = roomy.grpc_url
    n_sequences, threads, every, warmup = 1000, 4, 50, 100
    done = [0]
    lock = threading.Lock()
    errors: List[str] = []
    samples: List[Tuple[int, float]] = []

    def worker(w: int) -> None:
        with DiarizationClient(url, preset=SHORT) as client:
            for k in range(w, n_sequences, threads):
                audio = _short_audio(k)
                try:
                    if (k // threads) % 4 == 3:  # every worker's 4th: abandoned after two requests, no END
                        seq = RawSequence(url, SHORT, new_sequence_id())
                        for request in steps(SHORT, audio)[:2]:
                            if seq.step(request).error:
                                errors.append(f"sequence {k}: request refused")
                        seq.close()
                    elif not client.diarize(audio).finished:
                        errors.append(f"sequence {k} did not finish")
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"sequence {k}: {exc!r}")
                with lock:
                    done[0] += 1
                    if done[0] % every == 0:
                        samples.append((done[0], server_rss_mb(roomy.pid)))

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    t0 = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=900)
    seconds = time.monotonic() - t0
    time.sleep(IDLE_SECONDS + 1.5)
    with DiarizationClient(url, preset=SHORT) as client:  # lets the Python models expire what is left
        client.diarize(_short_audio(0))
    settled = server_rss_mb(roomy.pid)
    assert not errors, errors[:5]
    after_warmup = [mb for n, mb in samples if n >= warmup]
    base, peak = after_warmup[0], max(after_warmup)
    steps_mb = np.diff(after_warmup)
    typical = float(np.median(steps_mb))
    print(f"\nRSS of tritonserver + stubs over {n_sequences} sequences (every 4th abandoned) in {seconds:.0f} s: "
          f"after {warmup}: {base:.1f} MB, peak {peak:.1f} MB, end {samples[-1][1]:.1f} MB, "
          f"after idle expiry {settled:.1f} MB; median growth per {every} sequences {typical:+.2f} MB; "
          f"samples {[(n, round(mb, 1)) for n, mb in samples]}")
    # A leak grows with every abandoned sequence: a planted one (the Python models never expiring
    # state) measured +1.87 MB per 50 sequences (~150 kB per abandoned state, ultra_low, tiny model),
    # +35.5 MB in all, steadily. tritonserver's allocators (gRPC request pool, arenas) instead grow in
    # one-off steps that level off (seen in CI: +21 MB once between sequences 200 and 300, flat after;
    # a clean run here: median +0.04 MB), so the test bounds the typical (median) growth per 50
    # sequences tightly and the total only loosely.
    assert typical < 0.5, f"RSS grows steadily: median {typical:+.2f} MB per {every} sequences"
    assert peak - base < 60.0 and settled - base < 60.0


# ---- 4. overload ---------------------------------------------------------------------------------
def _stream_whole(url: str, audio: np.ndarray, **kw) -> Tuple[np.ndarray, tuple]:
    with DiarizationClient(url, protocol="grpc-stream", preset=LOW, **kw) as client:
        with client.open_stream() as stream:
            for start in range(0, audio.size, LOW.step_samples):
                stream.feed(audio[start:start + LOW.step_samples])
            result = stream.close()
    return result.probs, result.segments


def test_more_streams_than_slots_queue_and_finish(tight) -> None:
    url = tight.grpc_url
    audios = [conversation(4.0 + 0.5 * k, n_speakers=2, seed=300 + k)[0] for k in range(6)]
    solo = [_stream_whole(url, a) for a in audios]
    results: Dict[int, Tuple[np.ndarray, tuple]] = {}
    errors: List[str] = []

    def run(k: int) -> None:
        try:
            results[k] = _stream_whole(url, audios[k])
        except Exception as exc:  # noqa: BLE001
            errors.append(f"stream {k}: {exc!r}")

    pool = [threading.Thread(target=run, args=(k,)) for k in range(len(audios))]  # 6 streams, 2 slots
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in pool), "deadlock: streams still waiting after 300 s"
    assert not errors, errors
    for k, (probs, segments) in results.items():
        np.testing.assert_allclose(probs, solo[k][0], rtol=0, atol=1e-6)
        assert segments == solo[k][1]


def _hold_slots(url: str, n: int, seconds: float) -> threading.Thread:
    """``n`` streams that START and hold their slots ``seconds`` (a request every 0.4 s keeps them from
    going idle), then END."""
    plan = steps(LOW, conversation(12.0, n_speakers=2, seed=9)[0])

    def hold() -> None:
        seqs = [RawSequence(url, LOW, new_sequence_id()) for _ in range(n)]
        deadline = time.monotonic() + seconds
        k = 0
        while k == 0 or time.monotonic() < deadline:
            for seq in seqs:
                assert seq.step(plan[k]).error == ""
            k += 1
            time.sleep(0.4)
        for seq in seqs:
            seq.send(plan[k].audio, 0, end=True)  # 0 valid samples: the audio ends, and the sequence
            seq.close()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


def test_start_waiting_for_a_slot_times_out_clearly_then_retry_gets_through(tight) -> None:
    url = tight.grpc_url
    audio = conversation(3.0, n_speakers=2, seed=10)[0]
    holder = _hold_slots(url, 2, 4.0)
    time.sleep(0.5)
    with DiarizationClient(url, preset=LOW, timeout=1.0, retry=NO_RETRY) as client:
        with pytest.raises(RequestTimeout, match="timed out"):
            client.diarize(audio)
    holder.join()
    holder = _hold_slots(url, 2, 2.5)
    time.sleep(0.5)
    policy = RetryPolicy(attempts=6, backoff_s=0.5, max_backoff_s=2.0)
    t0 = time.monotonic()
    with DiarizationClient(url, preset=LOW, timeout=1.0, retry=policy) as client:
        with client.open_stream() as stream:
            stream.feed(audio)
            result = stream.close()
    holder.join()
    assert result.finished and stream.retries >= 1
    assert time.monotonic() - t0 > 1.5  # it really waited for the held slots
    # the server is healthy afterwards: the same audio gives the same result on a fresh stream
    probs, _ = _stream_whole(url, audio)
    np.testing.assert_allclose(result.probs, probs, rtol=0, atol=1e-6)


def test_backlog_wait_longer_than_the_idle_timeout_loses_the_sequence(tiny_repository, tiny_export_info,
                                                                      tmp_path, triton_server) -> None:
    """Why the idle timeout must exceed the longest backlog wait (docs: README "Operating it"): a START
    that waited for a slot longer than ``max_sequence_idle_microseconds`` runs, and Triton then reaps the
    sequence as idle, so its next request fails with a clear "must specify the START flag"."""
    repo = _repository(tiny_repository, tmp_path, int(tiny_export_info["emb_dim"]),
                       max_batch_size=1, max_candidate_sequences=1)
    url = triton_server(repo).grpc_url
    plan = steps(LOW, conversation(3.0, n_speakers=2, seed=14)[0])
    holder = _hold_slots(url, 1, IDLE_SECONDS + 1.5)
    time.sleep(0.3)
    late = RawSequence(url, LOW, new_sequence_id())
    try:
        t0 = time.monotonic()
        assert late.step(plan[0]).error == ""  # waited in the backlog, then ran
        assert time.monotonic() - t0 > IDLE_SECONDS
        # Triton's reaper looks at a backlogged sequence every 50 ms, but it runs at nice 10: on a busy
        # machine it can lag behind the client's next request, which would refresh the idle clock. A pause
        # of half the idle timeout gives it its turn; a sequence that had not waited survives such a pause.
        time.sleep(IDLE_SECONDS / 2)
        reply = late.step(plan[1])
        assert reply.outputs is None and "must specify the START flag" in reply.error
    finally:
        late.close()
        holder.join()


# ---- 5. a killed server leaves no process behind -----------------------------------------------------
@pytest.mark.triton  # starts its own LocalTritonServer (not through the triton_server fixture)
def test_stop_reaps_a_killed_servers_process_group(tiny_repository, tiny_export_info, tmp_path) -> None:
    repo = _repository(tiny_repository, tmp_path, int(tiny_export_info["emb_dim"]))
    server = LocalTritonServer(repo).start()
    group = server.pid
    stubs = [pid for pid in process_group_members(group) if pid != group]
    try:
        assert len(stubs) >= 4, "expected the Python stubs of the models in the server's process group"
        os.kill(stubs[0], signal.SIGSTOP)  # a hung stub: it will not notice that its server died
        os.kill(server.pid, signal.SIGKILL)
        server.stop()
        assert process_group_members(group) == []
    finally:
        server.stop()
        for pid in process_group_members(group):  # before the fix: do not leave the hung stub behind
            os.kill(pid, signal.SIGKILL)


# ---- 5. restart --------------------------------------------------------------------------------
@pytest.mark.triton  # starts its own LocalTritonServer (not through the triton_server fixture)
def test_server_killed_mid_stream_then_restarted(tiny_repository, tiny_export_info, tmp_path) -> None:
    repo = _repository(tiny_repository, tmp_path, int(tiny_export_info["emb_dim"]))
    audio = conversation(6.0, n_speakers=3, seed=12)[0]
    server = LocalTritonServer(repo).start()
    ports = dict(http_port=server.http_port, grpc_port=server.grpc_port, metrics_port=server.metrics_port)
    url = server.grpc_url
    restarted = None
    try:
        reference, _ = _stream_whole(url, audio)
        with DiarizationClient(url, protocol="grpc-stream", preset=LOW, timeout=10) as client:
            stream = client.open_stream()
            stream.feed(audio[: 4 * LOW.step_samples])
            group = server.pid  # the server leads its own process group (start_new_session)
            os.kill(server.pid, signal.SIGKILL)
            server.stop()  # reaps the group: no orphaned Python stub
            assert process_group_members(group) == []
            with pytest.raises(ServerUnavailable) as info:
                stream.feed(audio[4 * LOW.step_samples:])
            assert url in str(info.value)
            t0 = time.monotonic()
            stream.abort()  # the server is gone: returns at once
            assert time.monotonic() - t0 < 5 and stream.closed
        # a client opening a stream while the server is down rides out the restart with its retries
        outcome: Dict[str, object] = {}

        def patient() -> None:
            policy = RetryPolicy(attempts=10, backoff_s=1.0, max_backoff_s=4.0)
            try:
                with DiarizationClient(url, preset=LOW, timeout=10, retry=policy) as client:
                    with client.open_stream() as stream:
                        stream.feed(audio)
                        outcome["result"] = stream.close()
                        outcome["retries"] = stream.retries
            except Exception as exc:  # noqa: BLE001
                outcome["error"] = exc

        waiting = threading.Thread(target=patient)
        waiting.start()
        time.sleep(2.0)
        restarted = LocalTritonServer(repo, **ports).start()
        waiting.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["retries"] >= 1
        np.testing.assert_allclose(outcome["result"].probs, reference, rtol=0, atol=1e-6)
        probs, _ = _stream_whole(restarted.grpc_url, audio)  # and a plain new stream too
        np.testing.assert_allclose(probs, reference, rtol=0, atol=1e-6)
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()
