"""The NeMo Curator side venv (``build/venvs/curator``): Curator 1.4 needs numpy 2 and datasets>=4, which the
serving venv (numpy 1.26, tritonclient 2.51) cannot hold. Importable without Curator.

``curator_python()`` creates it once (``sortformer_triton.venvs.side_venv``; a stamp keyed by the pip
arguments makes later calls free) and returns its interpreter. Curator is installed as a normal pip package
(it brings ray, torch, datasets ...; torch pinned to the CPU build); our client comes from the repository's
``pyproject.toml`` ``curator`` extra (the client library without the CLI's plotting and scoring), installed editable (the venv runs this checkout's client with the newest
tritonclient and numpy 2), or, in a checkout without a ``pyproject.toml``, from the repository root on
``PYTHONPATH`` (``curator_env``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from sortformer_triton.venvs import REPO_ROOT, side_venv

VENV_NAME = "curator"
CURATOR_PINS = [
    "nemo-curator==1.4.0",
    "torch==2.13.0",  # Curator's dependency; the CPU wheel (the GPU is the Triton server's)
]
CLIENT_PINS = ["tritonclient[grpc,http]", "soxr", "soundfile"]  # our client's needs without a pyproject


def _pyproject() -> Optional[Path]:
    path = REPO_ROOT / "pyproject.toml"
    return path if path.is_file() else None


def pip_args() -> List[str]:
    """What ``pip install`` gets: Curator, CPU torch, and our client (the ``curator`` extra, or its pins)."""
    if _pyproject() is not None:
        # editable: the driver and every Ray worker import this checkout's code (never a stale copy), with the
        # curator extra's dependencies resolved next to Curator's (numpy 2, the newest tritonclient)
        return [*CURATOR_PINS, "-e", f"{REPO_ROOT}[curator]"]
    return [*CURATOR_PINS, *CLIENT_PINS]


def client_installed() -> bool:
    """True when the venv gets our client as an installed package (no ``PYTHONPATH`` needed)."""
    return _pyproject() is not None


def curator_python(quiet: bool = False) -> Path:
    """The interpreter of the Curator venv (created on first use: about two minutes on a cold pip cache)."""
    project = _pyproject()
    return side_venv(VENV_NAME, pip_args(), inputs=[project] if project is not None else [], quiet=quiet)


def curator_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment to run ``python -m clients.curator`` with in that venv: the repository root on
    ``PYTHONPATH`` unless the client is installed from ``pyproject.toml``."""
    env = dict(os.environ if base is None else base)
    if not client_installed():
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
