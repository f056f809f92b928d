"""Paced live streams through the proxy at 1, 2, 3 ... replicas: correctness under load and balance.

For each replica count R: ``LocalReplicaSet`` (R local tritonservers behind HAProxy, sequence affinity),
one locust run of N paced live streams through the proxy (``loadtest/locust``), then, per replica, the
requests its ensemble answered (Triton's own ``nv_inference_request_success``) and the sequences the
proxy's stick table placed on it. On one machine the replicas share its cores: read the table as
"streams stay correct and spread evenly", not as a speed-up (docs/replicas.md says the same).

    python -m loadtest.replicas --model-repository build/tiny/local --preset low --replicas 1,2,3 \\
        --users 8 --run-time 40 --markdown docs/replicas.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from clients.sortformer_client import PROTOCOLS
from sortformer_triton import contract
from sortformer_triton.presets import Preset, get_preset
from sortformer_triton.proxy import BACKENDS_BY_PROTOCOL
from sortformer_triton.replicas import LocalReplicaSet

from .common import REPO_ROOT, machine_info, parse_int_list, replace_marked_section, results_dir, timestamp
from .locust.run import LocustSummary, run_locust

MARKER = "replicas:locust"


@dataclasses.dataclass
class ReplicaRun:
    replicas: int
    locust: LocustSummary
    requests: Dict[str, int]  # ensemble requests answered, per replica
    sequences: Dict[str, int]  # sequences the proxy placed, per replica

    def row(self) -> Dict[str, object]:
        return {"replicas": self.replicas, "requests": self.requests, "sequences": self.sequences,
                **self.locust.row()}

    @property
    def spread(self) -> float:
        """The busiest replica's share of the requests over an even share (1.0 = perfectly even)."""
        total = sum(self.requests.values())
        return max(self.requests.values()) * len(self.requests) / total if total else float("nan")


def ensemble_requests(metrics_url: str, model: str) -> int:
    """``nv_inference_request_success`` of ``model`` on one server (Prometheus text)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    pattern = re.compile(r'^nv_inference_request_success\{[^}]*model="' + re.escape(model) + r'"[^}]*\}\s+(\S+)$',
                         re.MULTILINE)
    return int(sum(float(v) for v in pattern.findall(text)))


def placed_sequences(replica_set: LocalReplicaSet, backend: str) -> Dict[str, int]:
    """How many stick-table entries (sequences) point at each replica."""
    placed = list(replica_set.proxy.placements(backend).values())
    return {name: placed.count(name) for name in replica_set.names}


def run(model_repository: Path, preset: Preset, replica_counts: Sequence[int], users: int, run_time_s: float,
        protocol: str, out: Path) -> List[ReplicaRun]:
    runs: List[ReplicaRun] = []
    model = contract.ensemble_name(preset)
    for count in replica_counts:
        t0 = time.monotonic()
        with LocalReplicaSet(model_repository, replicas=count, work_dir=out / f"r{count}") as replica_set:
            print(f"{count} replica(s) ready behind the proxy in {time.monotonic() - t0:.1f} s", flush=True)
            url = replica_set.http_url if protocol == "http" else replica_set.grpc_url
            summary = run_locust(url, preset, users, run_time_s, out / f"r{count}", protocol=protocol)
            requests = {name: ensemble_requests(server.metrics_url, model)
                        for name, server in zip(replica_set.names, replica_set.servers)}
            sequences = placed_sequences(replica_set, BACKENDS_BY_PROTOCOL[protocol])
        runs.append(ReplicaRun(count, summary, requests, sequences))
        print(f"  requests per replica {requests}, sequences per replica {sequences}", flush=True)
    return runs


def markdown(runs: Sequence[ReplicaRun], preset: Preset, protocol: str, meta: Dict[str, object]) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['cpus']} CPU cores: the tiny model, preset `{preset.name}` "
        f"(one step per {preset.step_seconds:g} s per stream), {runs[0].locust.users} paced live streams over "
        f"{protocol}, {runs[0].locust.run_time_s:g} s per run, through HAProxy (`python -m loadtest.replicas`). "
        "Every replica runs on the same cores, so more replicas add no capacity here.",
        "",
        "| replicas | streams done | steps | failures | step p50 / p99 (ms) | lateness p99 (ms) | real time "
        "| requests per replica | sequences per replica | busiest / even |",
        "|---:|---:|---:|---:|---:|---:|:---:|---|---|---:|",
    ]
    for r in runs:
        s = r.locust
        lines.append(
            f"| {r.replicas} | {s.streams} | {s.steps} | {s.failures} | {s.latency_p50_ms:.0f} / {s.latency_p99_ms:.0f} "
            f"| {s.lateness_p99_ms:.0f} | {'yes' if s.realtime else 'no'} "
            f"| {' / '.join(str(v) for v in r.requests.values())} | {' / '.join(str(v) for v in r.sequences.values())} "
            f"| {r.spread:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.replicas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", type=Path, required=True, help="a local repository, e.g. build/tiny/local")
    ap.add_argument("--preset", default="low")
    ap.add_argument("--replicas", default="1,2,3", help="replica counts (default %(default)s)")
    ap.add_argument("--users", type=int, default=8, help="paced live streams per run (default %(default)s)")
    ap.add_argument("--run-time", type=float, default=40.0, help="seconds per run (default %(default)s)")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default results/replicas/<time>)")
    ap.add_argument("--markdown", type=Path, default=None, help=f"write the table into this file's {MARKER} section")
    args = ap.parse_args(argv)
    preset = get_preset(args.preset)
    out = results_dir("replicas", args.out or (REPO_ROOT / "results" / "replicas" / timestamp()))
    runs = run(args.model_repository, preset, parse_int_list(args.replicas), args.users, args.run_time,
               args.protocol, out)
    info = machine_info()
    meta = {"date": info["date_utc"], "cpus": info["nproc"], "machine": info}
    (out / "summary.json").write_text(json.dumps({**meta, "runs": [r.row() for r in runs]}, indent=2) + "\n")
    table = markdown(runs, preset, args.protocol, meta)
    print(table, flush=True)
    if args.markdown is not None:
        replace_marked_section(args.markdown, MARKER, table, "Replicas behind a proxy")
        print(f"wrote the table into {args.markdown}", flush=True)
    return 0 if all(r.locust.returncode == 0 and r.locust.failures == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
