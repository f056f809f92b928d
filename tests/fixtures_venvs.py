"""Side venvs made in the background while the rest of the suite runs.

Two test modules need venvs of their own (sortformer_triton.venvs): tests/test_packaging.py (the client extra
with the newest tritonclient and numpy 2) and tests/test_curator.py (NeMo Curator on Ray). On a fresh machine
pip needs minutes for them, mostly downloads and unpacking. When a session selects those modules, a thread
starts creating the venvs as soon as collection ends, and the two modules run last, so the suite's other
tests overlap the installs; the modules' own fixtures make the same ``side_venv`` calls, which wait on the
venv's lock and then find it made (or, if the background attempt failed, make it and report pip's error).
"""
from __future__ import annotations

import threading
from typing import Callable, List

import pytest

LATE_MODULES = ("tests.test_packaging", "tests.test_curator")


def _jobs(modules: set) -> List[Callable[[], object]]:
    jobs: List[Callable[[], object]] = []
    if "tests.test_packaging" in modules:
        from tests.test_packaging import client_venv_python

        jobs.append(client_venv_python)
    if "tests.test_curator" in modules:
        from clients.curator.env import curator_python

        jobs.append(lambda: curator_python(quiet=True))
    return jobs


def _run(jobs: List[Callable[[], object]]) -> None:
    for job in jobs:
        try:
            job()
        except Exception:  # noqa: BLE001 - the module's fixture repeats the call and reports the failure
            pass


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Run the modules that need side venvs last (stable order otherwise)."""
    items.sort(key=lambda item: getattr(item.module, "__name__", "") in LATE_MODULES)


def pytest_collection_finish(session: pytest.Session) -> None:
    modules = {getattr(item.module, "__name__", "") for item in session.items}
    jobs = _jobs(modules & set(LATE_MODULES))
    if jobs:
        threading.Thread(target=_run, args=(jobs,), name="side-venvs", daemon=True).start()
