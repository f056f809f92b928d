"""Exported repositories for load tests, benchmarks and tests, built once and reused.

``ensure_export`` runs ``python -m export`` as a subprocess (loadtest never imports ``export``) and
stamps the output with the arguments and a hash of every source file the export reads (``export/``,
``sortformer_triton/``, ``python_backend/``): a repository is reused only while both match, so a stale
tree is never benchmarked. A file lock makes parallel callers (pytest-xdist, two shells) export once.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .common import REPO_ROOT

STAMP_FILE = ".loadtest_export.json"
SOURCE_DIRS = ("export", "sortformer_triton", "python_backend")
EXPORT_TIMEOUT_S = 1800  # a full-size export of all presets takes minutes


class ExportError(RuntimeError):
    pass


def sources_hash(root: Path = REPO_ROOT) -> str:
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def export_args(out: Path, model: str = "tiny", presets: Optional[Sequence[str]] = None,
                max_batch_size: Optional[int] = None, max_candidate_sequences: Optional[int] = None,
                flavour: str = "both", instance_kind: Optional[str] = None, seed: int = 0) -> list:
    args = ["--model", model, "--out", str(out), "--flavour", flavour, "--seed", str(seed)]
    for name in presets or ():
        args += ["--preset", name]
    if max_batch_size is not None:
        args += ["--max-batch-size", str(max_batch_size)]
    if max_candidate_sequences is not None:
        args += ["--max-candidate-sequences", str(max_candidate_sequences)]
    if instance_kind is not None:
        args += ["--instance-kind", instance_kind]
    return args


def ensure_export(out: Path, model: str = "tiny", presets: Optional[Sequence[str]] = None,
                  max_batch_size: Optional[int] = None, max_candidate_sequences: Optional[int] = None,
                  flavour: str = "both", instance_kind: Optional[str] = None, seed: int = 0,
                  quiet: bool = True) -> Path:
    """``out`` holding an up-to-date export (``out/local``, ``out/production``); exports when needed."""
    out = Path(out).resolve()
    args = export_args(out, model, presets, max_batch_size, max_candidate_sequences, flavour, instance_kind, seed)
    wanted = {"args": args, "sources": sources_hash()}
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = out / STAMP_FILE
        try:
            if json.loads(stamp.read_text()) == wanted:
                return out
        except (OSError, ValueError):
            pass
        if stamp.exists():
            stamp.unlink()
        t0 = time.monotonic()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        proc = subprocess.run([sys.executable, "-m", "export", *args], cwd=str(REPO_ROOT), env=env,
                              capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            raise ExportError(f"python -m export {' '.join(args)} failed ({proc.returncode}):\n"
                              f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        stamp.write_text(json.dumps(wanted, indent=2) + "\n")
        if not quiet:
            print(f"exported {model} into {out} in {time.monotonic() - t0:.0f} s", flush=True)
        return out
