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

import gzip
import http.client
import json
import socket
from pathlib import Path
from typing import Dict, Set, Tuple

import numpy as np
import pytest

from clients.sortformer_client import NO_RETRY, DiarizationClient, StreamError, new_sequence_id
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


# ---- issue 12, item 1: one HTTP JSON request must not kill the server --------------------------------
# Triton 2.51 allocates an HTTP JSON input's declared shape before comparing it with the data:
# [1, 2**40] floats -> std::bad_alloc -> SIGABRT; [1, 2**28] ~1 GB RSS per 150 bytes; a gzip body inflates.
CRASH_BODY = json.dumps({"inputs": [
    {"name": "AUDIO", "shape": [1, 1099511627776], "datatype": "FP32", "data": [0.0]},
    {"name": "AUDIO_LENGTH", "shape": [1, 1], "datatype": "INT64", "data": [0]}]}).encode()
HUGE_BODY = CRASH_BODY.replace(b"1099511627776", str(2 ** 28).encode())
GZIP_BOMB = gzip.compress(b" " * (64 << 20))  # 64 MiB of spaces in ~64 KiB


def _post(url: str, body: bytes, headers: Dict[str, str]) -> Tuple[int, str]:
    conn = http.client.HTTPConnection(url, timeout=60)
    try:
        conn.request("POST", "/v2/models/diarizer_low/infer", body=body,
                     headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def test_one_http_json_request_cannot_kill_the_shipped_server(tiny_server) -> None:
    """The shipped defaults (server_flags, also compose's entrypoint) refuse HTTP inference without the
    key before reading the body; gRPC compares shape and bytes first. The server lives on."""
    for body, headers in ((CRASH_BODY, {}), (HUGE_BODY, {}), (GZIP_BOMB, {"Content-Encoding": "gzip"}),
                          (CRASH_BODY, {server_flags.HTTP_INFERENCE_HEADER: "not-the-key"})):
        status, text = _post(tiny_server.http_url, body, headers)
        assert status == 403 and "restricted" in text, (status, text[:200])
        assert tiny_server.running
    # the same declared shape over gRPC: refused by shape, nothing allocated
    seq = RawSequence(tiny_server.grpc_url, PRESET, new_sequence_id())
    try:
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc import service_pb2

        request = service_pb2.ModelInferRequest(model_name="diarizer_low")
        request.parameters["sequence_id"].int64_param = seq.sequence_id
        request.parameters["sequence_start"].bool_param = True
        for name, dtype, shape, raw in (("AUDIO", "FP32", [1, 2 ** 40], np.zeros(1, np.float32)),
                                        ("AUDIO_LENGTH", "INT64", [1, 1], np.zeros(1, np.int64))):
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, dtype
            tensor.shape.extend(shape)
            request.raw_input_contents.append(raw.tobytes())
        stub = seq.client._client_stub
        with pytest.raises(Exception, match="unexpected shape for input 'AUDIO'"):
            stub.ModelInfer(request, timeout=30)
        assert grpcclient  # imported for the service stub's message types
    finally:
        seq.close()
    assert tiny_server.running
    # trusted HTTP clients (the key from SORTFORMER_TRITON_HTTP_INFERENCE_KEY) are served
    with DiarizationClient(tiny_server.http_url, protocol="http", preset="low") as client:
        assert client.diarize(np.zeros(PRESET.step_samples * 2, np.float32)).finished
    with DiarizationClient(tiny_server.http_url, protocol="http", preset="low", http_inference_key="wrong",
                           retry=NO_RETRY) as client:
        with pytest.raises(StreamError, match="restricted"):
            client.diarize(np.zeros(PRESET.step_samples, np.float32))


def test_the_http_inference_key_flag_is_part_of_every_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(server_flags.HTTP_INFERENCE_KEY_ENV, "infer-key")
    flags = server_flags.command(["tritonserver"], "abc")
    assert "--http-restricted-api=inference:triton-inference-key=infer-key" in flags
    monkeypatch.delenv(server_flags.HTTP_INFERENCE_KEY_ENV)
    assert server_flags.configured_http_inference_key() is None
    first = [f for f in server_flags.safe_flags("abc") if f.startswith("--http-restricted-api=inference:")]
    second = [f for f in server_flags.safe_flags("abc") if f.startswith("--http-restricted-api=inference:")]
    assert len(first) == 1 and first != second  # unset: a random key, HTTP inference closed
