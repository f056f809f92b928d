"""Replicas behind HAProxy with sequence affinity (sortformer_triton.proxy / .replicas), against real processes.

Two local tritonservers serve the tiny model's ``low`` preset behind Debian's haproxy. Streams through the
proxy must equal their solo runs on one server, over every protocol, interleaved; a replica killed
mid-run fails only its own streams, with ``ServerUnavailable``; new streams and START retries land on
the survivor; a restarted replica rejoins without moving the streams that started while it was away.
Round robin without affinity breaks streams (the affinity is what makes them work, not luck).
"""
from __future__ import annotations

import dataclasses
import http.client
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from clients.sortformer_client import DiarizationClient, RetryPolicy, ServerUnavailable, StreamError
from clients.sortformer_client.retry import NO_RETRY
from sortformer_triton import proxy as proxy_config
from sortformer_triton.local_server import LOOPBACK
from sortformer_triton.presets import get_preset
from sortformer_triton.replicas import LocalProxy, LocalReplicaSet, find_haproxy
from sortformer_triton.samples import conversation
from tests.fixtures_models import preset_repository

pytestmark = pytest.mark.triton

LOW = get_preset("low")
PROTOCOLS = ("grpc", "grpc-stream", "http")
STEP = LOW.step_samples
BACKEND = proxy_config.BACKENDS_BY_PROTOCOL


@pytest.fixture(scope="module")
def replica_set(tiny_repository, tiny_export_info, tmp_path_factory):
    repo = preset_repository(tiny_repository, tmp_path_factory.mktemp("replicas"), [LOW],
                             int(tiny_export_info["emb_dim"]), idle_seconds=60, max_batch_size=4,
                             max_candidate_sequences=16)
    with LocalReplicaSet(repo, replicas=2) as replicas:
        yield replicas


@pytest.fixture(scope="module")
def audios() -> List[np.ndarray]:
    return [conversation(6.0, n_speakers=2, seed=40 + k)[0] for k in range(4)]


@pytest.fixture(scope="module")
def solo(replica_set, audios) -> List[Tuple[np.ndarray, tuple]]:
    """Each audio streamed alone, straight to one replica (no proxy)."""
    return [_whole(DiarizationClient(replica_set.servers[0].grpc_url, preset=LOW), audio) for audio in audios]


def _whole(client: DiarizationClient, audio: np.ndarray) -> Tuple[np.ndarray, tuple]:
    with client:
        result = client.diarize(audio)
    return result.probs, tuple(result.segments)


def _client(replica_set: LocalReplicaSet, protocol: str, retry: RetryPolicy = NO_RETRY,
            url: Optional[str] = None) -> DiarizationClient:
    if url is None:
        url = replica_set.http_url if protocol == "http" else replica_set.grpc_url
    return DiarizationClient(url, protocol=protocol, preset=LOW, retry=retry, timeout=30.0,
                             http_inference_key=replica_set.http_inference_key)


def _same(result, reference: Tuple[np.ndarray, tuple]) -> None:
    np.testing.assert_allclose(result.probs, reference[0], rtol=0, atol=1e-6)
    assert tuple(result.segments) == reference[1]


@dataclasses.dataclass
class Live:
    """A stream opened through the proxy and fed its first seconds: where it lives, and its audio."""

    protocol: str
    client: DiarizationClient
    stream: object
    audio_index: int
    replica: Optional[str] = None


def _open(replica_set: LocalReplicaSet, audios, protocol: str, audio_index: int, seconds: float = 2.0,
          retry: RetryPolicy = NO_RETRY) -> Live:
    client = _client(replica_set, protocol, retry)
    stream = client.open_stream()
    stream.feed(audios[audio_index][: int(seconds * 16000)])
    live = Live(protocol, client, stream, audio_index)
    live.replica = replica_set.proxy.replica_of(stream.sequence_id, BACKEND[protocol])
    return live


def _finish(live: Live, audios, seconds: float = 2.0):
    try:
        live.stream.feed(audios[live.audio_index][int(seconds * 16000):])
        return live.stream.close()
    finally:
        live.client.close()


# ---- the configuration (no server) ---------------------------------------------------------------
def test_config_keeps_sequences_on_their_replica_and_haproxy_accepts_it(tmp_path: Path) -> None:
    replicas = [proxy_config.Replica("a", "10.0.0.1"), proxy_config.Replica("b", "10.0.0.2", 9000, 9001)]
    text = proxy_config.haproxy_config(replicas)
    for backend in (proxy_config.GRPC_BACKEND, proxy_config.HTTP_BACKEND):
        block = text.split(f"\nbackend {backend}\n", 1)[1].split("\n\n", 1)[0]
        assert f"stick on req.hdr({proxy_config.SEQUENCE_HEADER})" in block
        assert "option persist" in block and "balance leastconn" in block
    assert "no option redispatch" in text  # a running sequence's request never moves to another replica
    assert "server b 10.0.0.2:9001 proto h2 check port 9000 check-proto h1" in text
    assert "server b 10.0.0.2:9000 check" in text
    rr = proxy_config.haproxy_config(replicas, proxy_config.ProxySettings(balance="round_robin"))
    assert "stick" not in rr and "balance roundrobin" in rr
    discovered = proxy_config.haproxy_config(proxy_config.Discovery("triton.ns.svc.cluster.local", 4))
    assert "server-template replica 4 _grpc._tcp.triton.ns.svc.cluster.local" in discovered
    haproxy = find_haproxy()
    for k, cfg in enumerate((text, rr, discovered)):
        path = tmp_path / f"{k}.cfg"
        path.write_text(cfg)
        check = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("bad, match", [
    (dict(replicas=[]), "at least one replica"),
    (dict(replicas=[proxy_config.Replica("a", "h"), proxy_config.Replica("a", "k")]), "unique"),
    (dict(settings=dict(balance="random")), "balance"),
    (dict(settings=dict(grpc_port=70000)), "port"),
    (dict(settings=dict(stick_expire_s=0)), "stick_expire_s"),
])
def test_config_refuses_bad_settings(bad: Dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        settings = proxy_config.ProxySettings(**bad.get("settings", {}))
        proxy_config.haproxy_config(bad.get("replicas", [proxy_config.Replica("a", "h")]), settings)
    with pytest.raises(ValueError, match="replica name"):
        proxy_config.Replica("a b", "h")


# ---- affinity ------------------------------------------------------------------------------------
def test_interleaved_streams_over_every_protocol_equal_their_solo_runs(replica_set, audios, solo) -> None:
    """Twelve streams at once (four per protocol; each in its own thread, as an HTTP client must be), all
    open before any goes on, their requests interleaved through the proxy and spread over both replicas;
    each equals its solo run."""
    jobs = [(protocol, k) for protocol in PROTOCOLS for k in range(len(audios))]
    opened = threading.Barrier(len(jobs), timeout=120)
    lives: Dict[int, Live] = {}
    results: Dict[int, object] = {}
    errors: List[str] = []

    def run(i: int) -> None:
        protocol, k = jobs[i]
        try:
            lives[i] = _open(replica_set, audios, protocol, k)
            opened.wait()
            results[i] = _finish(lives[i], audios)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{protocol} stream {i}: {exc!r}")
            opened.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for protocol in PROTOCOLS:
        assert {live.replica for live in lives.values() if live.protocol == protocol} == set(replica_set.names), \
            f"{protocol}: the streams did not spread over both replicas"
    for i, live in lives.items():
        _same(results[i], solo[live.audio_index])


def test_round_robin_without_affinity_breaks_streams(replica_set, audios, solo, tmp_path: Path) -> None:
    """The same replicas behind a proxy that balances each request on its own: the second request of a
    stream reaches the replica without its START, which refuses it."""
    with LocalProxy(replica_set.replicas(), tmp_path, balance="round_robin", name="round_robin") as rr:
        for protocol in ("grpc", "http"):
            url = rr.http_url if protocol == "http" else rr.grpc_url
            with _client(replica_set, protocol, url=url) as client:
                with pytest.raises(StreamError, match="must specify the START flag"):
                    client.diarize(audios[0])
        # a gRPC stream is one HTTP/2 stream, which the proxy keeps on one replica by itself
        with _client(replica_set, "grpc-stream", url=rr.grpc_url) as client:
            _same(client.diarize(audios[0]), solo[0])


# ---- failover ------------------------------------------------------------------------------------
def test_killed_replica_fails_only_its_streams_then_survivors_take_new_ones_and_it_rejoins(
        replica_set, audios, solo) -> None:
    victim, survivor = replica_set.names
    lives = [_open(replica_set, audios, protocol, k) for protocol in PROTOCOLS for k in range(len(audios))]
    for protocol in PROTOCOLS:
        assert {live.replica for live in lives if live.protocol == protocol} == {victim, survivor}
    replica_set.kill(0)
    try:
        for live in lives:
            if live.replica == victim:
                with pytest.raises(ServerUnavailable):
                    _finish(live, audios)
            else:
                _same(_finish(live, audios), solo[live.audio_index])
        # new streams land on the survivor, on every protocol, and are right
        during = [_open(replica_set, audios, protocol, 1) for protocol in PROTOCOLS]
        assert {live.replica for live in during} == {survivor}
    finally:
        replica_set.restart(0)
    # the replica rejoined: the streams that started while it was away stay where they are ...
    for live in during:
        _same(_finish(live, audios), solo[1])
    # ... and new streams land on it again
    after = [_open(replica_set, audios, "grpc", k) for k in range(4)]
    assert {live.replica for live in after} == {victim, survivor}
    for live in after:
        _same(_finish(live, audios), solo[live.audio_index])


def test_start_retry_lands_on_the_survivor_before_the_proxy_notices(replica_set, audios, solo) -> None:
    """A replica dies and the proxy has not noticed yet (health checks paused): a START sent to it fails
    (503, ``ServerUnavailable``) and the client's retry, a new sequence id, goes to the survivor."""
    victim, survivor = replica_set.names
    proxy = replica_set.proxy
    for name in replica_set.names:
        proxy.set_checks(name, False)
    try:
        replica_set.kill(0, wait=False)
        assert proxy.states()[victim] == "UP"  # as far as the proxy knows
        policy = RetryPolicy(attempts=4, backoff_s=0.05, max_backoff_s=0.2)
        retries = 0
        for protocol in PROTOCOLS:
            for k in range(2):
                with _client(replica_set, protocol, retry=policy) as client:
                    with client.open_stream() as stream:
                        stream.feed(audios[k])
                        result = stream.close()
                    retries += stream.retries
                    assert proxy.replica_of(stream.sequence_id, BACKEND[protocol]) == survivor
                _same(result, solo[k])
        assert retries >= 1, "no START went to the dead replica: the test proved nothing"
    finally:
        for name in replica_set.names:
            proxy.set_checks(name, True)
        proxy.wait_until(lambda states: states[victim] != "UP", f"{victim} DOWN")
        replica_set.restart(0)


def test_proxy_refuses_an_oversized_http_body_before_any_replica_reads_it(replica_set) -> None:
    conn = http.client.HTTPConnection(LOOPBACK, replica_set.proxy.http_port, timeout=10)
    try:
        conn.putrequest("POST", f"/v2/models/diarizer_{LOW.name}/infer")
        conn.putheader("Content-Length", str(proxy_config.DEFAULT_MAX_BODY_BYTES + 1))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()


def test_load_table_reports_balance_per_replica() -> None:
    from loadtest.locust.run import LocustSummary
    from loadtest.replicas import ReplicaRun, markdown

    summary = LocustSummary(preset="low", users=6, run_time_s=40, step_seconds=0.48, warmup_s=1, streams=12,
                            steps=480, failures=0, latency_p50_ms=100, latency_p90_ms=150, latency_p99_ms=200,
                            latency_max_ms=250, lateness_p50_ms=1, lateness_p99_ms=4, lateness_max_ms=5,
                            steps_per_second=12, returncode=0, realtime=True, prefix="low_u6")
    runs = [ReplicaRun(1, summary, {"replica0": 500}, {"replica0": 12}),
            ReplicaRun(2, summary, {"replica0": 300, "replica1": 200}, {"replica0": 7, "replica1": 5})]
    assert runs[0].spread == 1.0 and runs[1].spread == pytest.approx(1.2)
    table = markdown(runs, LOW, "grpc", {"date": "today", "cpus": 2})
    assert "| 2 | 12 | 480 | 0 | 100 / 200 | 4 | yes | 300 / 200 | 7 / 5 | 1.20 |" in table
