"""docker-compose.yml and the production repository it serves.

No docker engine runs here: ``docker compose config`` validates the file where the compose plugin
exists (skipped otherwise), and a structural check with PyYAML always runs. The production repository
(what the NGC tritonserver loads) is the session's tiny export (``tests/fixtures_models.py``:
``tiny_repository``); it must pass ``sortformer_triton.validator`` (the onnxruntime backend's load-time
rules of NGC 24.10, tested on counter-examples in tests/test_validator.py, which also runs every graph in
onnxruntime 1.19.2 with the config's shapes).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml

from sortformer_triton import contract, offline, repository, server_flags
from sortformer_triton.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: Any, env: Dict[str, str]) -> Any:
    """Compose's ${VAR:-default} interpolation (what `docker compose config` would print)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> Dict[str, Any]:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), {})


def _services(compose: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return compose["services"]


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    return proc.returncode == 0


# ---- the compose file ------------------------------------------------------------------------------
@pytest.mark.skipif(not _docker_compose_available(), reason="the docker compose plugin is not installed here")
@pytest.mark.parametrize("profiles", [[], ["gpu"], ["gateway"], ["replicas"]])
def test_docker_compose_config(profiles: List[str]) -> None:
    args = ["docker", "compose", "-f", str(COMPOSE)] + [a for p in profiles for a in ("--profile", p)]
    proc = subprocess.run(args + ["config", "--quiet"], capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_compose_services_and_profiles(compose: Dict[str, Any]) -> None:
    services = _services(compose)
    assert set(services) == {"export", "triton", "export-gpu", "triton-gpu", "gateway",
                             "triton-replica-1", "triton-replica-2", "proxy"}
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert default == {"export", "triton"}  # `docker compose up` = CPU export + CPU server
    assert services["export-gpu"]["profiles"] == ["gpu"] and services["triton-gpu"]["profiles"] == ["gpu"]
    assert services["gateway"]["profiles"] == ["gateway"]
    for name in ("triton-replica-1", "triton-replica-2", "proxy"):
        assert services[name]["profiles"] == ["replicas"]
    assert set(compose["volumes"]) == {"models", "models-gpu", "hf-cache"}


def test_compose_export_services(compose: Dict[str, Any]) -> None:
    services = _services(compose)
    for name, kind, volume in (("export", "KIND_CPU", "models"), ("export-gpu", "KIND_GPU", "models-gpu")):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "docker/export.Dockerfile"
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["command"] == ["python", "docker/export_once.py", "--out", "/models"]
        assert svc["restart"] == "no"  # one-shot
        assert svc["user"] == "1000:1000"
        env = svc["environment"]
        assert env["SORTFORMER_INSTANCE_KIND"] == kind
        assert env["PYTHONPATH"] == "/opt/sortformer"
        assert env["SORTFORMER_MODEL"] == "nvidia/diar_streaming_sortformer_4spk-v2.1"
        assert f"{volume}:/models" in svc["volumes"]  # the named volume caches the export
        for src in ("export", "sortformer_triton", "python_backend", "docker/export_once.py"):
            assert f"./{src}:/opt/sortformer/{src}:ro" in svc["volumes"]
            assert (ROOT / src).exists()


def _assert_server(svc: Dict[str, Any], volume: str, host_ports: Tuple[str, str, str]) -> None:
    assert svc["image"] == NGC_IMAGE
    assert svc["user"] == "1000:1000"  # the image's non-root triton-server user
    cmd = svc["command"]
    # the safe flags come from the one module the local server uses too, run as the entrypoint
    assert cmd[:4] == ["python3", "/opt/sortformer/sortformer_triton/server_flags.py", "--", "tritonserver"]
    assert "--model-repository=/models/production" in cmd
    full = server_flags.command(cmd[3:], "k")
    assert "--model-control-mode=none" in full and any(f.startswith("--grpc-restricted-protocol=") for f in full)
    assert "SORTFORMER_TRITON_ADMIN_KEY" in svc["environment"]
    assert f"{volume}:/models:ro" in svc["volumes"]
    assert "./sortformer_triton:/opt/sortformer/sortformer_triton:ro" in svc["volumes"]
    assert svc["environment"]["PYTHONPATH"] == "/opt/sortformer"
    test = " ".join(svc["healthcheck"]["test"])
    assert "/v2/health/ready" in test and "8000" in test
    if host_ports:
        assert [f"127.0.0.1:{h}:{c}" for h, c in zip(host_ports, ("8000", "8001", "8002"))] == svc["ports"]
    else:
        assert "ports" not in svc  # reached through the proxy only
    assert svc["shm_size"]


def test_compose_cpu_server(compose: Dict[str, Any]) -> None:
    svc = _services(compose)["triton"]
    _assert_server(svc, "models", ("8000", "8001", "8002"))
    assert svc["depends_on"] == {"export": {"condition": "service_completed_successfully"}}
    assert "deploy" not in svc  # CPU by default


def test_compose_gpu_server(compose: Dict[str, Any]) -> None:
    svc = _services(compose)["triton-gpu"]
    _assert_server(svc, "models-gpu", ("8100", "8101", "8102"))
    assert svc["depends_on"] == {"export-gpu": {"condition": "service_completed_successfully"}}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_compose_replicas_behind_the_proxy(compose: Dict[str, Any]) -> None:
    """Profile ``replicas``: two servers like the CPU one, without ports, sharing one HTTP inference key,
    and HAProxy with the generated configuration naming exactly them."""
    from deploy import render

    services = _services(compose)
    for name in render.COMPOSE_REPLICAS:
        svc = services[name]
        _assert_server(svc, "models", ())
        assert svc["depends_on"] == {"export": {"condition": "service_completed_successfully"}}
        assert svc["environment"][server_flags.HTTP_INFERENCE_KEY_ENV] == ""  # ${...:-}: the same value for both
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    assert all(raw[n]["environment"][server_flags.HTTP_INFERENCE_KEY_ENV] == "${SORTFORMER_TRITON_HTTP_INFERENCE_KEY:-}"
               for n in render.COMPOSE_REPLICAS)
    proxy = services["proxy"]
    assert proxy["image"] == "haproxy:2.6"
    assert proxy["depends_on"] == {n: {"condition": "service_healthy"} for n in render.COMPOSE_REPLICAS}
    source, target, mode = proxy["volumes"][0].split(":")
    assert (ROOT / source).resolve() == render.COMPOSE_CFG and target == "/usr/local/etc/haproxy/haproxy.cfg" and mode == "ro"
    assert proxy["ports"] == [f"127.0.0.1:{h}:{c}" for h, c in
                              (("8200", render.PROXY_HTTP_PORT), ("8201", render.PROXY_GRPC_PORT),
                               ("8204", render.PROXY_STATS_PORT))]
    cfg = render.COMPOSE_CFG.read_text()
    assert cfg == render.rendered()[render.COMPOSE_CFG], "deploy/haproxy/compose.cfg is stale: python -m deploy.render"
    servers = re.findall(r"^\s+server (\S+) (\S+):(\d+)", cfg, re.MULTILINE)
    assert {(n, h) for n, h, _ in servers} == {(n, n) for n in render.COMPOSE_REPLICAS}
    assert {p for _, _, p in servers} == {"8000", "8001"}  # the containers' HTTP and gRPC ports
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    check = subprocess.run([haproxy, "-c", "-f", str(render.COMPOSE_CFG)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_compose_gateway(compose: Dict[str, Any]) -> None:
    svc = _services(compose)["gateway"]
    assert svc["command"][:3] == ["python", "-m", "clients.gateway"]
    assert svc["depends_on"] == {"triton": {"condition": "service_healthy"}}
    assert svc["ports"] == ["127.0.0.1:8080:8080"]
    assert svc["user"] == "1000:1000"
    assert (ROOT / svc["build"]["dockerfile"]).is_file()
    assert "./clients:/opt/sortformer/clients:ro" in svc["volumes"]
    assert "./sortformer_triton:/opt/sortformer/sortformer_triton:ro" in svc["volumes"]


def test_compose_gateway_settings_are_what_the_module_reads(compose: Dict[str, Any]) -> None:
    """The service's command and environment, parsed by the gateway's own CLI: Triton by its service name,
    listening on the container port that is published, with a health check on the gateway's /health."""
    from clients.gateway.__main__ import parse_args

    svc = _services(compose)["gateway"]
    env = {k: str(v) for k, v in svc["environment"].items()}
    args = parse_args(svc["command"][3:], environ=env)
    assert args.config.triton_url == "triton:8001" and args.host == "0.0.0.0" and args.preset == "low"
    published = svc["ports"][0].rsplit(":", 1)[1]
    assert str(args.port) == published == "8080"
    probe = svc["healthcheck"]["test"][-1]
    assert f"http://127.0.0.1:{args.port}/health" in probe
    assert env["PYTHONPATH"] == svc["working_dir"] == "/opt/sortformer"


def test_compose_ports_follow_the_bind_variable() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    exposed = _interpolate(raw, {"TRITON_BIND": "0.0.0.0", "TRITON_GRPC_PORT": "9001"})
    assert exposed["services"]["triton"]["ports"][1] == "0.0.0.0:9001:8001"


def test_dockerfiles_send_only_requirements() -> None:
    for name, keep in (("export", ["!requirements.txt", "!requirements-export.txt"]),
                       ("gateway", ["!requirements.txt"])):
        lines = [line.strip() for line in (ROOT / "docker" / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
        assert lines == ["*", *keep]
    text = (ROOT / "docker" / "export.Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in text and "USER 1000:1000" in text


# ---- the one-shot export entrypoint ------------------------------------------------------------------
def _load_export_once():
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_once", ROOT / "docker" / "export_once.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_export_once_command_parses_with_the_exporter() -> None:
    from export.__main__ import parse_args

    once = _load_export_once()
    conf = once.settings({"SORTFORMER_MODEL": "tiny", "SORTFORMER_PRESETS": "low, high",
                          "SORTFORMER_INSTANCE_KIND": "KIND_GPU", "SORTFORMER_MAX_CANDIDATE_SEQUENCES": "32"})
    cmd = once.export_command(conf, Path("/models"))
    assert cmd[1:3] == ["-m", "export"]
    args = parse_args(cmd[3:])
    assert (args.model, args.flavour, args.instance_kind) == ("tiny", "production", "KIND_GPU")
    assert args.preset == ["low", "high"] and args.max_candidate_sequences == 32 and args.max_batch_size == 8
    assert once.settings({})["model"] == "nvidia/diar_streaming_sortformer_4spk-v2.1"
    assert args.sequence_idle_seconds is None
    idle = once.export_command(once.settings({"SORTFORMER_SEQUENCE_IDLE_SECONDS": "90"}), Path("/m"))
    assert parse_args(idle[3:]).sequence_idle_seconds == 90
    assert parse_args(cmd[3:]).offline_model is None
    off = once.export_command(once.settings({"SORTFORMER_OFFLINE_MODEL": "tiny",
                                             "SORTFORMER_OFFLINE_MAX_SECONDS": "45"}), Path("/m"))
    args = parse_args(off[3:])
    assert (args.offline_model, args.offline_max_seconds) == ("tiny", 45.0)


def test_export_once_skips_a_cached_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    once = _load_export_once()
    monkeypatch.setenv("SORTFORMER_MODEL", "tiny")
    (tmp_path / "production").mkdir()
    (tmp_path / "production" / "export_info.json").write_text("{}")
    stamp = {"settings": once.settings(), "sources": once.sources_hash()}
    (tmp_path / once.STAMP).write_text(json.dumps(stamp))
    calls: List[List[str]] = []
    monkeypatch.setattr(once.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    assert once.main(["--out", str(tmp_path)]) == 0
    assert calls == [] and "up to date" in capsys.readouterr().out
    monkeypatch.setenv("SORTFORMER_MAX_BATCH_SIZE", "4")  # a changed setting exports again
    assert once.main(["--out", str(tmp_path)]) == 0
    assert len(calls) == 1 and "--max-batch-size" in calls[0] and calls[0][calls[0].index("--max-batch-size") + 1] == "4"
    assert json.loads((tmp_path / once.STAMP).read_text())["settings"]["max_batch_size"] == 4


# ---- the production repository vs its ONNX graphs ----------------------------------------------------
@pytest.fixture(scope="module")
def production(tiny_repository: Path) -> Path:
    return tiny_repository / "production"


def test_production_repository_layout(production: Path) -> None:
    names = {p.name for p in production.iterdir() if p.is_dir()}
    expected = {contract.POSTPROCESSOR, contract.ADMISSION} | set(offline.MODELS)
    for p in PRESETS.values():
        expected |= set(contract.preset_models(p))
    assert names == expected
    for name in names:
        config = repository.parse((production / name / "config.pbtxt").read_text())
        assert config.name == name
        assert (production / name / "1").is_dir()
        if config.platform == "ensemble":
            for step in config.ensemble_scheduling.step:
                assert step.model_name in names
        elif config.backend == "python":
            assert name in (contract.POSTPROCESSOR, contract.ADMISSION, offline.ADMISSION, offline.POSTPROCESSOR)
            assert (production / name / "1" / "model.py").is_file()
        else:
            assert config.backend == "onnxruntime", name
            assert (production / name / "1" / config.default_model_filename).is_file()


def test_production_configs_match_onnx_graphs(production: Path) -> None:
    """What NGC's onnxruntime backend checks at load (sortformer_triton.validator, tests/test_validator.py),
    plus this project's own rules for the stateful models."""
    from tritonclient.grpc import model_config_pb2 as mc

    from sortformer_triton import validator

    assert validator.validate_repository(production) == []
    checked = 0
    for config_path in sorted(production.glob("*/config.pbtxt")):
        config = repository.parse(config_path.read_text())
        if config.backend != "onnxruntime" or config.name == offline.SORTFORMER:  # offline: no state
            continue
        sb = config.sequence_batching
        assert list(sb.state), f"{config.name}: production stateful models keep implicit state"
        assert config.max_batch_size >= 1
        for s in sb.state:
            init = s.initial_state[0]
            assert init.zero_data and list(init.dims) == list(s.dims) and init.data_type == s.data_type
            assert min(s.dims) >= 1
        assert {c.name for c in sb.control_input} == {contract.START}  # no CORRID/END: those are local-only
        assert "state_spec" not in config.parameters
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        checked += 1
    assert checked == 2 * len(PRESETS)


def test_gpu_export_sets_kind_gpu_on_the_onnx_models_only() -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    configs = repository.model_configs("production", list(PRESETS.values()), 64, instance_kind="KIND_GPU")
    for name, config in configs.items():
        if config.backend == "onnxruntime":
            assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU, name
        elif config.backend == "python":
            assert all(g.kind != mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group), name
