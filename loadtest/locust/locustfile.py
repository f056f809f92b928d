"""Locust users that are live audio streams, paced in real time, on the client library.

Each user is one live stream of a synthetic conversation (``sortformer_triton.samples``): it opens a
``clients.sortformer_client.Stream`` (one Triton sequence on ``diarizer_<preset>``), feeds one step of
audio when that step's audio would have been fully captured by a microphone (``t0 + (i + 1) x step
duration``), and when the audio is over calls ``Stream.close()``, which sends the partial last step, the
flush steps and END. Then it starts the next stream. A stream never has more than one request in
flight (the sequence's order), so when the server is slower than real time the stream falls behind.

Recorded per step (locust request events, so they appear in the CSV and HTML reports):

- ``<protocol> step <preset>``: step latency, request sent -> response received (what Triton and the
  network add to the algorithmic latency); failures are any client-library error;
- ``lateness <preset>`` (request_type ``lateness``): how far behind real time the stream sent the step
  (0 while the server keeps up; grows when responses take longer than a step duration). It is a
  custom metric reported as a request: locust's "Aggregated" row mixes it with the steps, so read the
  named rows.

Every step is also written to ``--steps-csv`` (one row per request: stream, index, kind, time the audio
was ready, time sent, latency, lateness) and ``loadtest.locust.run`` summarises it (percentiles after a
warm-up, real-time verdict). Run it through ``python -m loadtest.locust.run`` or directly::

    locust -f loadtest/locust/locustfile.py --headless -u 4 -r 4 -t 60s --host grpc://127.0.0.1:8001 \\
        --preset low --csv results/locust/low --html results/locust/low.html

gRPC under gevent needs ``grpc.experimental.gevent.init_gevent()`` before any channel exists: done at
import, right after locust's own monkey patching.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import gevent
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, events, task
from locust.user.users import LOCUST_STATE_STOPPING

grpc_gevent.init_gevent()

# locust imports this file by path: make the repository importable whatever the working directory
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import numpy as np  # noqa: E402

from clients.sortformer_client import NO_RETRY, PROTOCOLS, DiarizationClient, DiarizationError  # noqa: E402
from loadtest.perf_analyzer.make_input_data import default_seconds, stream_audio  # noqa: E402
from sortformer_triton.presets import SAMPLE_RATE, Preset, get_preset  # noqa: E402

AUDIO_SEED = 7919  # other conversations than perf_analyzer's input data (seed 0)
DEFAULT_STOP_TIMEOUT_S = 30.0
STOP_POLL_S = 0.05
STEP_FIELDS = ["user", "stream", "sequence_id", "index", "kind", "ready_s", "sent_s", "latency_ms",
               "lateness_ms", "ok", "error"]


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("sortformer live streams")
    group.add_argument("--preset", default="low", help="streaming preset (ensemble diarizer_<preset>)")
    group.add_argument("--protocol", default="grpc", choices=PROTOCOLS,
                       help="client-library transport (default grpc: unary calls on one shared channel)")
    group.add_argument("--audio-seconds", type=float, default=0.0,
                       help="length of each stream's conversation (0 = per preset: 30/30/60/90 s)")
    group.add_argument("--distinct-audio", type=int, default=4,
                       help="distinct conversations generated up front (users rotate and shift them)")
    group.add_argument("--start-jitter", type=float, default=-1.0,
                       help="each user waits uniform(0, this) s before its first stream (default: one step) "
                            "so steps of different streams spread over the step period")
    group.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    group.add_argument("--steps-csv", default="", help="write every step's timings here at the end")


class _Recorder:
    """Per-step timings of this locust process (one process: loadtest.locust.run uses no workers)."""

    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.streams = 0

    def reset(self) -> None:
        self.rows.clear()
        self.t0 = time.monotonic()
        self.streams = 0

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def write(self, path: str, meta: Dict[str, Any]) -> None:
        if not path:
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=STEP_FIELDS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow(row)
        target.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


RECORDER = _Recorder()
_SHARED: Dict[str, Any] = {}


def _options(environment: Any) -> Any:
    return environment.parsed_options


def _audio_pool(seconds: float, count: int) -> List[np.ndarray]:
    """Distinct synthetic conversations (2-4 speakers, lengths up to 10 % shorter than ``seconds``)."""
    return [stream_audio(i, seconds, seed=AUDIO_SEED) for i in range(max(count, 1))]


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    """Connect, check the server, make the audio, once, before any user starts: a missing server or
    preset fails the run at once and loudly (exit code 2) instead of as thousands of failed steps."""
    opts = _options(environment)
    if opts is None:  # used as a library (no command line): nothing to prepare
        return
    preset = get_preset(opts.preset)
    seconds = opts.audio_seconds or default_seconds(preset)
    # no START retries: a load test counts every failed request
    client = DiarizationClient(environment.host or "127.0.0.1:8001", protocol=opts.protocol, preset=preset,
                               timeout=opts.request_timeout, retry=NO_RETRY)
    try:
        client.check()
    except DiarizationError as exc:
        client.close()  # an open gevent-gRPC channel would hang the interpreter's exit
        logging.getLogger("locustfile").error("cannot start: %s", exc)
        sys.exit(2)
    _SHARED.update(preset=preset, client=client, seconds=seconds,
                   audio=_audio_pool(seconds, opts.distinct_audio),
                   jitter=preset.step_seconds if opts.start_jitter < 0 else opts.start_jitter)
    if not getattr(environment, "stop_timeout", None):
        # stop between two requests of a stream, never mid-request: a cancelled gRPC request leaves its
        # sequence unusable (the END that should free it is refused), so users get time to finish
        environment.stop_timeout = DEFAULT_STOP_TIMEOUT_S


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    RECORDER.reset()


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    opts = _options(environment)
    preset: Optional[Preset] = _SHARED.get("preset")
    meta = {
        "preset": preset.to_dict() if preset else None,
        "step_seconds": preset.step_seconds if preset else None,
        "protocol": opts.protocol,
        "audio_seconds": _SHARED.get("seconds"),
        "users": getattr(opts, "num_users", None),
        "host": environment.host,
        "streams_started": RECORDER.streams,
        "duration_s": time.monotonic() - RECORDER.t0,
        "pid": os.getpid(),
    }
    RECORDER.write(opts.steps_csv, meta)


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    client = _SHARED.pop("client", None)
    if client is not None:
        client.close()  # an open gevent-gRPC channel would hang the interpreter's exit


class LiveStream(User):
    """One live stream after another, each paced at real time (one step per step duration)."""

    wait_time = constant(0)
    _next_id = 0

    def on_start(self) -> None:
        LiveStream._next_id += 1
        self.user_id = LiveStream._next_id
        self.rng = random.Random(self.user_id)
        self._sleep_until(time.monotonic() + self.rng.uniform(0.0, _SHARED["jitter"]))

    def _audio(self) -> np.ndarray:
        pool: List[np.ndarray] = _SHARED["audio"]
        base = pool[(self.user_id + self.rng.randrange(len(pool))) % len(pool)]
        return np.roll(base, self.rng.randrange(base.size))  # a different stream each time

    def _report(self, name: str, kind: str, started: float, latency_s: float,
                exc: Optional[BaseException] = None, request_type: Optional[str] = None) -> None:
        self.environment.events.request.fire(
            request_type=request_type or _SHARED["client"].protocol, name=name, response_time=latency_s * 1000.0,
            response_length=0, exception=exc, context={"kind": kind}, start_time=started, url=None)

    def _record(self, stream_no: int, sequence_id: int, index: int, kind: str, ready: float, sent: float,
                latency_s: float, error: str = "") -> None:
        preset: Preset = _SHARED["preset"]
        lateness = max(0.0, sent - ready) if kind != "flush" else 0.0
        RECORDER.add(user=self.user_id, stream=stream_no, sequence_id=sequence_id, index=index, kind=kind,
                     ready_s=round(ready - RECORDER.t0, 6), sent_s=round(sent - RECORDER.t0, 6),
                     latency_ms=round(latency_s * 1000.0, 3), lateness_ms=round(lateness * 1000.0, 3),
                     ok=int(not error), error=error)
        if not error:
            self._report(f"step {preset.name}", kind, sent, latency_s)
            if kind != "flush":
                self._report(f"lateness {preset.name}", kind, sent, lateness, request_type="lateness")

    @property
    def stopping(self) -> bool:
        return self._state == LOCUST_STATE_STOPPING

    def _sleep_until(self, when: float) -> bool:
        """Sleep until ``when`` (monotonic); False when the user is being stopped meanwhile."""
        while not self.stopping:
            delay = when - time.monotonic()
            if delay <= 0:
                return True
            gevent.sleep(min(delay, STOP_POLL_S))
        return False

    @task
    def live_stream(self) -> None:
        self.one_stream()

    def one_stream(self) -> None:
        if self.stopping:
            return
        preset: Preset = _SHARED["preset"]
        client: DiarizationClient = _SHARED["client"]
        audio = self._audio()
        step, rate = preset.step_samples, float(SAMPLE_RATE)
        full = audio.size // step
        RECORDER.streams += 1
        stream_no = RECORDER.streams
        sequence_id, index, sent = 0, 0, time.monotonic()
        try:
            with client.open_stream() as stream:
                sequence_id = stream.sequence_id
                t0 = time.monotonic()
                for i in range(full):
                    ready = t0 + (i + 1) * step / rate  # the step's audio is complete now
                    if not self._sleep_until(ready):
                        stream.abort()  # END between two requests: the server frees the sequence
                        return
                    index, sent = i, time.monotonic()
                    for update in stream.feed(audio[i * step:(i + 1) * step]):
                        self._record(stream_no, sequence_id, update.index, "audio", ready, sent, update.latency_s)
                ready = t0 + audio.size / rate  # the recording ends: partial step, flush steps, END
                if not self._sleep_until(ready):
                    stream.abort()
                    return
                index, sent = full, time.monotonic()
                result = stream.close()
                for k, update in enumerate(result.tail_updates):
                    kind = "end" if k == 0 else "flush"
                    self._record(stream_no, sequence_id, update.index, kind, ready, sent, update.latency_s)
                    sent += update.latency_s  # the next flush step went out when this one returned
                if not result.finished:
                    raise DiarizationError(f"stream {sequence_id} ended without FINISHED")
        except DiarizationError as exc:
            failed_at = time.monotonic()
            self._record(stream_no, sequence_id, index, "error", sent, sent, failed_at - sent, error=str(exc)[:300])
            self._report(f"step {preset.name}", "error", sent, failed_at - sent, exc=exc)
