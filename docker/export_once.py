"""The compose ``export`` service: build the production model repository once, then reuse it.

Runs ``python -m export --flavour production --out <out>`` with the settings from the environment, and
stamps ``<out>/.export_stamp.json`` with those settings and a hash of the exporter's sources. On the
next ``docker compose up`` the export is skipped while the stamp matches (the named volume caches the
repository across runs); a changed setting or changed code exports again. ``SORTFORMER_FORCE_EXPORT=1``
always exports.

Environment (all optional):
  SORTFORMER_MODEL                   HF id (default nvidia/diar_streaming_sortformer_4spk-v2.1, needs
                                     internet), a .nemo path inside the container, or full / tiny
                                     (random init)
  SORTFORMER_PRESETS                 comma list (default: all four presets)
  SORTFORMER_INSTANCE_KIND           KIND_CPU (default) or KIND_GPU
  SORTFORMER_MAX_BATCH_SIZE          default 8
  SORTFORMER_MAX_CANDIDATE_SEQUENCES default 16 (sequence slots: size above the peak stream count)
  SORTFORMER_SEQUENCE_IDLE_SECONDS   Triton's sequence idle timeout (default per preset, >= 60 s)
  SORTFORMER_OFFLINE_MODEL           also serve an offline Sortformer v1 as diarizer_offline: HF id
                                     (nvidia/diar_sortformer_4spk-v1), a .nemo path, or full / tiny (default:
                                     none)
  SORTFORMER_OFFLINE_MAX_SECONDS     the longest recording one offline request may carry (default 90)
  SORTFORMER_FORCE_EXPORT            1 = export even when the stamp matches
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CODE_ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("export", "sortformer_triton", "python_backend")
STAMP = ".export_stamp.json"
FLAVOUR = "production"


def settings(env: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    env = dict(os.environ if env is None else env)
    presets = [p.strip() for p in env.get("SORTFORMER_PRESETS", "").split(",") if p.strip()]
    return {
        "model": env.get("SORTFORMER_MODEL") or "nvidia/diar_streaming_sortformer_4spk-v2.1",
        "presets": presets,
        "instance_kind": env.get("SORTFORMER_INSTANCE_KIND") or "KIND_CPU",
        "max_batch_size": int(env.get("SORTFORMER_MAX_BATCH_SIZE") or 8),
        "max_candidate_sequences": int(env.get("SORTFORMER_MAX_CANDIDATE_SEQUENCES") or 16),
        "sequence_idle_seconds": int(env["SORTFORMER_SEQUENCE_IDLE_SECONDS"])
        if env.get("SORTFORMER_SEQUENCE_IDLE_SECONDS") else None,
        "offline_model": env.get("SORTFORMER_OFFLINE_MODEL") or None,
        "offline_max_seconds": float(env["SORTFORMER_OFFLINE_MAX_SECONDS"])
        if env.get("SORTFORMER_OFFLINE_MAX_SECONDS") else None,
    }


def export_command(conf: Dict[str, object], out: Path) -> List[str]:
    cmd = [sys.executable, "-m", "export", "--model", str(conf["model"]), "--out", str(out),
           "--flavour", FLAVOUR, "--instance-kind", str(conf["instance_kind"]),
           "--max-batch-size", str(conf["max_batch_size"]),
           "--max-candidate-sequences", str(conf["max_candidate_sequences"])]
    if conf.get("sequence_idle_seconds") is not None:
        cmd += ["--sequence-idle-seconds", str(conf["sequence_idle_seconds"])]
    for preset in conf["presets"]:  # type: ignore[union-attr]
        cmd += ["--preset", str(preset)]
    if conf.get("offline_model"):
        cmd += ["--offline-model", str(conf["offline_model"])]
        if conf.get("offline_max_seconds") is not None:
            cmd += ["--offline-max-seconds", str(conf["offline_max_seconds"])]
    return cmd


def sources_hash(root: Path = CODE_ROOT) -> str:
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/models"))
    args = ap.parse_args(argv)
    conf = settings()
    wanted = {"settings": conf, "sources": sources_hash()}
    stamp = args.out / STAMP
    ready = (args.out / FLAVOUR / "export_info.json").is_file()
    force = os.environ.get("SORTFORMER_FORCE_EXPORT", "0") not in ("", "0", "false", "no")
    if ready and not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == wanted:
                print(f"export: {args.out / FLAVOUR} is up to date ({conf['model']}); nothing to do", flush=True)
                return 0
        except ValueError:
            pass
    if stamp.exists():
        stamp.unlink()
    cmd = export_command(conf, args.out)
    print("export: " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=str(CODE_ROOT))
    if code != 0:
        print(f"export: failed with exit code {code}", file=sys.stderr, flush=True)
        return code
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
