"""``python -m clients.demo``: start the local tritonserver on a repository, stream a sample
conversation through one preset's ensemble, and print the segments next to the reference turns."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

from sortformer_triton.local_server import LocalTritonServer
from sortformer_triton.samples import conversation

from .sortformer_client import PROTOCOLS, DiarizationClient


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clients.demo", description=__doc__)
    ap.add_argument("--repository", type=Path, default=Path("build/demo/local"), help="a local-flavour repository")
    ap.add_argument("--preset", default="high")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the sample conversation")
    ap.add_argument("--speakers", type=int, default=3)
    ap.add_argument("--protocol", default="grpc", choices=PROTOCOLS)
    args = ap.parse_args(argv)
    console = Console()
    info_file = args.repository / "export_info.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    if info.get("random_init"):
        console.print(f"[yellow]The model ({info.get('source')}) is a RANDOM-INIT model of the real architecture: "
                      "segments are meaningless; the serving path is real.[/yellow]")
    audio, turns = conversation(args.seconds, args.speakers, seed=7)
    with console.status("starting tritonserver ..."):
        server = LocalTritonServer(args.repository).start()
    try:
        console.print(f"tritonserver ready in {server.start_seconds:.1f} s: gRPC {server.grpc_url}, HTTP {server.http_url}")
        client = DiarizationClient(server.grpc_url if args.protocol != "http" else server.http_url,
                                   protocol=args.protocol, preset=args.preset)
        t0 = time.perf_counter()
        result = client.diarize(audio, sample_rate=16000)
        took = time.perf_counter() - t0
    finally:
        server.stop()
    table = Table(title=f"diarizer_{args.preset}: {result.duration_s:.1f} s of audio in {took:.1f} s "
                        f"({result.requests} requests, {result.n_frames} frames confirmed)")
    for col in ("start s", "end s", "speaker"):
        table.add_column(col, justify="right")
    for seg in sorted(result.segments, key=lambda s: (s.start, s.speaker)):
        table.add_row(f"{seg.start:.2f}", f"{seg.end:.2f}", f"speaker_{seg.speaker}")
    console.print(table)
    console.print("reference turns of the sample: " + ", ".join(
        f"{t.start:.1f}-{t.end:.1f} s spk{t.speaker}" for t in turns[:8]) + (" ..." if len(turns) > 8 else ""))
    return 0 if result.finished else 1


if __name__ == "__main__":
    sys.exit(main())
