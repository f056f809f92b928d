"""Pytest fixtures that run the real local tritonserver (the nvidia-pytriton wheel's 2.51).

``triton_server`` is a factory: ``server = triton_server(repo_path)`` starts a server on free loopback
ports for that model repository (or returns the one already running for it in this module) and stops
it when the module's tests are done. ``triton_server_session`` does the same for the whole session,
for repositories shared by several test modules. Tests that use them are marked ``triton``, so
``pytest -m "not triton"`` skips every test that needs a server.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path
from typing import Callable, Dict, Iterator

import pytest

from sortformer_triton import server_flags
from sortformer_triton.local_server import LocalTritonServer

ServerFactory = Callable[..., LocalTritonServer]

TRITON_MARK = "triton"

# HTTP inference needs a key on this project's servers (server_flags): one per test session, in the
# environment, where the servers the tests start and the client library (and the CLI, gateway and load
# tools they spawn) read it
os.environ.setdefault(server_flags.HTTP_INFERENCE_KEY_ENV, secrets.token_hex(16))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{TRITON_MARK}: needs a real local tritonserver (nvidia-pytriton)")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Mark every test that uses a server fixture, so ``-m "not triton"`` deselects them."""
    for item in items:
        if {"triton_server", "triton_server_session"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.triton)


def _require_tritonserver() -> None:
    """Skip (not fail) only where the wheel is not installed at all; any other problem fails."""
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("nvidia-pytriton (the local tritonserver) is not installed")


@pytest.fixture(scope="session")
def _servers_of_session() -> Iterator[Dict[Path, LocalTritonServer]]:
    servers: Dict[Path, LocalTritonServer] = {}
    yield servers
    _stop_all(servers)


@pytest.fixture(scope="module")
def _servers_of_module() -> Iterator[Dict[Path, LocalTritonServer]]:
    servers: Dict[Path, LocalTritonServer] = {}
    yield servers
    _stop_all(servers)


def _stop_all(servers: Dict[Path, LocalTritonServer]) -> None:
    for server in servers.values():
        server.stop()
    servers.clear()


def _factory(servers: Dict[Path, LocalTritonServer]) -> ServerFactory:
    def start(repo_path: os.PathLike | str, **kwargs: object) -> LocalTritonServer:
        """Start (or reuse) a server for ``repo_path``; kwargs go to :class:`LocalTritonServer`."""
        _require_tritonserver()
        key = Path(repo_path).resolve()
        server = servers.get(key)
        if server is not None and server.running:
            return server
        server = LocalTritonServer(key, **kwargs)  # type: ignore[arg-type]
        servers[key] = server
        return server.start()

    return start


@pytest.fixture(scope="module")
def triton_server(_servers_of_module: Dict[Path, LocalTritonServer]) -> ServerFactory:
    """Factory: ``triton_server(repo_path, **LocalTritonServer kwargs)``; stopped after the module."""
    return _factory(_servers_of_module)


@pytest.fixture(scope="session")
def triton_server_session(_servers_of_session: Dict[Path, LocalTritonServer]) -> ServerFactory:
    """Factory like ``triton_server``, but servers live until the end of the test session."""
    return _factory(_servers_of_session)
