"""Safe defaults of the served endpoints (issue 7, item 7), checked on a real tritonserver.

- every endpoint (HTTP, gRPC, metrics) listens on 127.0.0.1 only;
- model control mode none: load/unload are refused, even with the admin key;
- the admin APIs (model repository, shared memory, logging, trace) are refused without the
  ``triton-admin-key`` header and answered with it; health, metadata, config, statistics and inference
  stay open;
- request size: anything but exactly one step of audio is refused before a model sees it, also a
  64 MB request, and the server goes on serving;
- the flags come from ``sortformer_triton.server_flags`` (also the production entrypoint, see
  tests/test_compose.py), which refuses a command that would override them.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Set

import numpy as np
import pytest

from clients.sortformer_client import DiarizationClient, new_sequence_id
from sortformer_triton import server_flags
from sortformer_triton.local_server import REPO_ROOT, LocalTritonServer
from sortformer_triton.presets import get_preset
from tests.rawseq import RawSequence

PRESET = get_preset("low")


def _listening(pid: int) -> Set[str]:
    """'address:port' of every TCP socket the process listens on (from /proc; IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            if family == socket.AF_INET:
                addr = socket.inet_ntop(family, raw[::-1])
            else:
                addr = socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            found.add(f"{addr}:{int(hex_port, 16)}")
    return found


def test_every_endpoint_listens_on_loopback_only(tiny_server) -> None:
    listening = _listening(tiny_server.pid)
    ports = {tiny_server.http_port, tiny_server.grpc_port, tiny_server.metrics_port}
    assert {int(a.rsplit(":", 1)[1]) for a in listening} >= ports
    loopback = ("127.0.0.1:", "::ffff:127.0.0.1:")  # the metrics endpoint uses a v4-mapped IPv6 socket
    assert all(a.startswith(loopback) for a in listening), listening


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_admin_apis_are_restricted_and_model_control_is_off(protocol: str, tiny_server) -> None:
    from tritonclient.utils import InferenceServerException

    if protocol == "grpc":
        import tritonclient.grpc as module

        url = tiny_server.grpc_url
    else:
        import tritonclient.http as module

        url = tiny_server.http_url
    client = module.InferenceServerClient(url)
    key = server_flags.admin_headers(tiny_server.admin_key, protocol)
    wrong = server_flags.admin_headers("not-the-key", protocol)
    try:
        for call in (client.get_model_repository_index, client.get_system_shared_memory_status,
                     client.get_log_settings, client.get_trace_settings,
                     lambda **kw: client.unload_model("diarizer_low", **kw)):
            for headers in (None, wrong):
                with pytest.raises(InferenceServerException, match="restricted"):
                    call(headers=headers)
        index = client.get_model_repository_index(headers=key)
        names = {m.name for m in index.models} if protocol == "grpc" else {m["name"] for m in index}
        assert "diarizer_low" in names
        with pytest.raises(InferenceServerException, match="not allowed"):  # model control mode none
            client.unload_model("diarizer_low", headers=key)
        # open APIs
        assert client.is_server_ready() and client.is_model_ready("diarizer_low")
        assert client.get_model_metadata("diarizer_low") and client.get_model_config("diarizer_low")
        assert client.get_inference_statistics("diarizer_low")
    finally:
        client.close()
    # the client library works against the restricted server (it asks each preset's ensemble)
    with DiarizationClient(url, protocol=protocol, preset="low") as lib:
        lib.check()
        assert set(lib.served_presets()) == {"ultra_low", "low", "high", "very_high"}


def test_requests_of_any_other_size_are_refused(tiny_server) -> None:
    seq = RawSequence(tiny_server.grpc_url, PRESET, new_sequence_id())
    try:
        for n in (PRESET.step_samples - 1, PRESET.step_samples * 10, 16 * 1024 * 1024):  # the last: 64 MB
            reply = seq.send(np.zeros(n, np.float32), 0, start=True)
            assert reply.outputs is None and "unexpected shape for input 'AUDIO'" in reply.error, reply.error[:200]
    finally:
        seq.close()
    with DiarizationClient(tiny_server.grpc_url, preset="low") as client:  # still serving
        result = client.diarize(np.zeros(PRESET.step_samples * 3, np.float32))
    assert result.finished


def test_server_flags_are_one_source_and_cannot_be_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = server_flags.safe_flags("abc")
    assert "--model-control-mode=none" in flags and "--strict-readiness=true" in flags
    restricted = "model-repository,shared-memory,logging,trace:triton-admin-key=abc"
    assert f"--http-restricted-api={restricted}" in flags and f"--grpc-restricted-protocol={restricted}" in flags
    with pytest.raises(ValueError, match="drop them"):
        server_flags.command(["tritonserver", "--model-control-mode=explicit"], "abc")
    monkeypatch.setenv(server_flags.ADMIN_KEY_ENV, "my-key_1")
    assert server_flags.admin_key() == "my-key_1"
    monkeypatch.setenv(server_flags.ADMIN_KEY_ENV, "bad key;")
    with pytest.raises(ValueError, match="letters, digits"):
        server_flags.admin_key()
    monkeypatch.delenv(server_flags.ADMIN_KEY_ENV)
    first, second = server_flags.admin_key(), server_flags.admin_key()
    assert first != second and len(first) >= 24  # random: the APIs stay closed


@pytest.mark.triton  # needs the wheel's tritonserver binary (it never gets to start it)
def test_local_server_extra_args_cannot_override_the_safe_flags() -> None:
    # the local server builds its command with server_flags.command, as the compose entrypoint does
    with pytest.raises(ValueError, match="drop them"):
        LocalTritonServer(REPO_ROOT / "model_repository" / "local", extra_args=["--strict-readiness=false"]).start()


def test_admin_key_never_reaches_the_log(tiny_server) -> None:
    assert tiny_server.admin_key not in tiny_server.log_path.read_text()
