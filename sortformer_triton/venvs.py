"""Side venvs: interpreters with packages this project's own venv cannot hold, created once and reused.

The serving venv pins numpy 1.26 and tritonclient 2.51 (NGC 24.10's). Some checks need other worlds: NGC's
onnxruntime 1.19.2 (``loadtest.ort_versions``), the client extra with the newest tritonclient and numpy 2,
NeMo Curator on Ray. Each lives under ``build/venvs/<name>``; a stamp file holds a digest of the pip
arguments (and of any files named in ``inputs``), so a changed requirement rebuilds the venv and an
unchanged one costs nothing. Creation is serialized by a lock file, so parallel test workers share one venv.
"""
from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_ROOT = REPO_ROOT / "build" / "venvs"


class VenvError(RuntimeError):
    """A side venv could not be created (pip failed); the message carries pip's last lines."""


def _digest(pip_args: Sequence[str], inputs: Iterable[Path]) -> str:
    h = hashlib.sha256("\0".join(pip_args).encode())
    for path in inputs:
        h.update(b"\0" + str(path).encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()[:16]


def side_venv(name: str, pip_args: Sequence[str], inputs: Iterable[Path] = (), root: Optional[Path] = None,
              python: str = sys.executable, quiet: bool = False) -> Path:
    """The interpreter of venv ``name`` with ``pip install <pip_args>`` done (created or rebuilt as needed).

    ``inputs``: files whose content the install depends on (a pyproject.toml, a constraints file)."""
    venv = (root or VENV_ROOT) / name
    interpreter = venv / "bin" / "python"
    digest = _digest(list(pip_args), list(inputs))
    stamp = venv / f".installed-{digest}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and interpreter.exists():
            return interpreter
        if venv.exists():
            shutil.rmtree(venv)
        if not quiet:
            print(f"creating {venv} (pip install {' '.join(pip_args)}) ...", file=sys.stderr, flush=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        done = subprocess.run([str(interpreter), "-m", "pip", "install", "-q", *pip_args],
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise VenvError(f"pip install into {venv} failed ({done.returncode}):\n{tail}")
        stamp.touch()
    return interpreter
