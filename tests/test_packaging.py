"""Packaging: ``pip install ".[client]"`` gives a working ``diarize`` with only what the client needs.

- the pyproject's dependency ranges and the exact pins scripts/setup.sh installs (requirements*.txt,
  constraints.txt) name the same packages, and every pin lies in its range (one list cannot drift from the
  other unnoticed);
- what the client library imports (clients.sortformer_client, clients.diarize and the sortformer_triton
  modules they reach) is covered by the ``client`` extra (``live``: sounddevice);
- the wheel, built from the checkout's files, holds the packages ``clients`` and ``sortformer_triton`` (with
  the gateway's static files) and nothing else (no tests/, export/, build/, generated models);
- a clean side venv (build/venvs/client, ``sortformer_triton.venvs``) with ``pip install .[client]`` resolves
  the newest tritonclient and numpy 2 and holds no torch, NeMo, pytriton or onnxruntime; its ``diarize``
  console script, run outside the checkout against the tiny model's real tritonserver over gRPC and HTTP,
  writes the RTTM and JSON that this venv's library (tritonclient 2.51, numpy 1.26) computes for the same
  file, and its ``diarize eval`` scores as this venv's evaluator does.

The venv is created once (about 1.5 min on a fresh machine, 50 s with pip's cache warm: it downloads the
client's dependencies) and rebuilt only when pyproject.toml changes; the project itself is reinstalled into
it (``--no-deps``, a few seconds) from a fresh wheel (build/wheels, built again when a checkout file
changes) whenever the packaged files change.
"""
from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
import pytest
import soundfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from clients.sortformer_client import DiarizationClient, load_audio, write_rttm
from clients.sortformer_client.transport import check_parameters
from sortformer_triton.samples import conversation
from sortformer_triton.venvs import REPO_ROOT, side_venv

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = REPO_ROOT / "pyproject.toml"
PIN_FILES = ("requirements.txt", "requirements-export.txt")
SELF = canonicalize_name("sortformer-triton")
PACKAGES = ("clients", "sortformer_triton")
# never part of the client: the serving and export stacks
NOT_CLIENT = {"torch", "nemo-toolkit", "nvidia-pytriton", "onnx", "onnxruntime", "onnxscript"}
NOT_IMPORTABLE = ("torch", "nemo", "pytriton", "onnxruntime", "onnx")
PRESET = "low"
# lazy imports in modules the client reaches, inside code that only the server runs: (module, package) -> why
SERVER_ONLY_IMPORTS: Dict[Tuple[str, str], str] = {}
# JSON keys that differ from run to run (the random sequence id, the time taken) or name the invocation
VOLATILE = ("sequence_id", "processing_s", "audio", "server", "segment_params")


# ---- the dependency lists ---------------------------------------------------------------------------
def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def _ranges() -> Dict[str, List[Tuple[str, Requirement]]]:
    """canonical name -> [(extra or "dependencies", requirement)] of the pyproject (self-references left out)."""
    project = _pyproject()["project"]
    groups = {"dependencies": project.get("dependencies", []), **project.get("optional-dependencies", {})}
    out: Dict[str, List[Tuple[str, Requirement]]] = {}
    for group, specs in groups.items():
        for spec in specs:
            req = Requirement(spec)
            if canonicalize_name(req.name) != SELF:
                out.setdefault(canonicalize_name(req.name), []).append((group, req))
    return out


def _pins(names: Tuple[str, ...] = PIN_FILES) -> Dict[str, Requirement]:
    out: Dict[str, Requirement] = {}
    for name in names:
        for line in (REPO_ROOT / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                assert canonicalize_name(req.name) not in out, f"{req.name} pinned twice"
                out[canonicalize_name(req.name)] = req
    return out


def _pinned_version(req: Requirement) -> Optional[Version]:
    exact = [s for s in req.specifier if s.operator == "=="]
    return Version(exact[0].version) if exact else None


def _extra_names(extra: str, seen: Optional[Set[str]] = None) -> Set[str]:
    """Canonical names an extra installs, following self-references (``sortformer-triton[client]``)."""
    seen = set() if seen is None else seen
    if extra in seen:
        return set()
    seen.add(extra)
    project = _pyproject()["project"]
    names = {canonicalize_name(Requirement(s).name) for s in project.get("dependencies", [])}
    for spec in project["optional-dependencies"][extra]:
        req = Requirement(spec)
        if canonicalize_name(req.name) == SELF:
            for inner in req.extras:
                names |= _extra_names(inner, seen)
        else:
            names.add(canonicalize_name(req.name))
    return names


def test_pyproject_ranges_and_setup_pins_name_the_same_packages() -> None:
    ranges, pins = _ranges(), _pins()
    assert sorted(set(ranges) - set(pins)) == [], "in pyproject.toml but not pinned in requirements*.txt"
    assert sorted(set(pins) - set(ranges)) == [], "pinned in requirements*.txt but in no pyproject extra"
    for name, uses in ranges.items():
        pin = pins[name]
        version = _pinned_version(pin)
        assert version is not None, f"{pin} in {PIN_FILES} is not an exact pin"
        for group, req in uses:
            assert req.specifier.contains(version, prereleases=True), \
                f"pyproject [{group}] {req} excludes the pinned {pin}"
            assert set(req.extras) <= set(pin.extras), f"pyproject [{group}] {req} wants extras the pin {pin} lacks"
    # constraints.txt repeats some pins (for NeMo's resolver): the same versions
    for name, req in _pins(("constraints.txt",)).items():
        if name in pins and _pinned_version(req) is not None:
            assert _pinned_version(req) == _pinned_version(pins[name]), f"constraints.txt {req} != {pins[name]}"


def test_extras_are_what_a_user_expects() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"client", "live", "gateway", "serve", "export", "loadtest", "test"} <= set(extras)
    client = _extra_names("client")
    assert not client & NOT_CLIENT, f"the client extra pulls in {sorted(client & NOT_CLIENT)}"
    assert {"numpy", "tritonclient", "soundfile", "soxr", "matplotlib", "rich", "pyannote-metrics"} <= client
    assert "sounddevice" in _extra_names("live") and "sounddevice" not in client
    assert {"starlette", "uvicorn", "websockets"} <= _extra_names("gateway")
    assert {"nvidia-pytriton", "onnxruntime"} <= _extra_names("serve")
    assert {canonicalize_name(Requirement(line.split("#")[0]).name)
            for line in (REPO_ROOT / "requirements-export.txt").read_text().splitlines()
            if line.split("#")[0].strip()} <= _extra_names("export")
    assert {"pytest", "hypothesis"} <= _extra_names("test")
    scripts = _pyproject()["project"]["scripts"]
    assert scripts == {"diarize": "clients.diarize.cli:main"}  # what python -m clients.diarize runs


# ---- what the client imports ------------------------------------------------------------------------
def _module_file(name: str) -> Optional[Path]:
    path = REPO_ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imported_names(path: Path, module: str) -> Iterator[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # function-level imports too
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # may name a submodule


def client_imports() -> Dict[str, Set[str]]:
    """Third-party top-level modules imported by the client library's closure -> the modules importing them."""
    todo = [f"clients.{sub}.{p.stem}".removesuffix(".__init__")
            for sub in ("sortformer_client", "diarize") for p in (REPO_ROOT / "clients" / sub).glob("*.py")]
    seen: Set[str] = set()
    third: Dict[str, Set[str]] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:k]) for k in range(1, len(parts)))  # importing a module runs its packages
        path = _module_file(module)
        if path is None:
            continue
        for name in _imported_names(path, module):
            top = name.split(".")[0]
            if top in PACKAGES:
                if _module_file(name) is not None:
                    todo.append(name)
            elif top and top != "__future__" and top not in sys.stdlib_module_names:
                third.setdefault(top, set()).add(module)
    return third


def test_client_library_imports_only_what_the_client_extra_installs() -> None:
    third = client_imports()
    assert "numpy" in third and "tritonclient" in third  # the walk found the library
    distributions = importlib.metadata.packages_distributions()
    client, live = _extra_names("client"), _extra_names("live")
    bad = []
    for top, users in sorted(third.items()):
        dists = {canonicalize_name(d) for d in distributions.get(top, [top])}
        if dists & client:
            continue
        if dists & live and users <= {"clients.diarize.live"}:
            continue  # the microphone: the live extra
        users = {u for u in users if (u, top) not in SERVER_ONLY_IMPORTS}
        if not users:
            continue
        bad.append(f"{top} (distribution {sorted(dists)}) imported by {sorted(users)}")
    assert not bad, "the client library imports packages outside its extra:\n" + "\n".join(bad)


def test_request_parameters_take_numpy_scalars() -> None:
    """numpy 2's repr of np.float64(0.6) is 'np.float64(0.6)': parameters are sent as the Python values."""
    got = check_parameters({"onset": np.float64(0.6), "offset": np.float32(0.5), "median_filter_frames": np.int64(3),
                            "flag": np.bool_(True), "plain": 0.25})
    assert got == {"onset": "0.6", "offset": "0.5", "median_filter_frames": 3, "flag": True, "plain": "0.25"}
    assert type(got["median_filter_frames"]) is int and type(got["flag"]) is bool


# ---- the wheel ---------------------------------------------------------------------------------------
def _checkout_files() -> List[str]:
    """The checkout's files as git sees them (tracked and untracked, .gitignore'd ones left out)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO_ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the tree less what .gitignore names
        skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "results", "__pycache__", "*.egg-info",
                                      "*.onnx", "*.onnx.data", "*.nemo", ".*cache", ".hypothesis")
        found = []
        for folder, dirs, files in os.walk(REPO_ROOT):
            ignored = skip(folder, dirs + files)
            dirs[:] = [d for d in dirs if d not in ignored]
            found += [os.path.relpath(os.path.join(folder, f), REPO_ROOT) for f in files if f not in ignored]
        return sorted(found)
    return sorted(p for p in listed.decode().split("\0") if p and (REPO_ROOT / p).is_file())


WHEELS = REPO_ROOT / "build" / "wheels"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built (pip wheel, build isolation) from a copy of the checkout's files (a build
    in the tree itself would reuse setuptools' build/lib, where files deleted since stay); kept under
    build/wheels/<digest of those files> so an unchanged checkout is not built again."""
    files = _checkout_files()
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0" + (REPO_ROOT / name).read_bytes() + b"\0")
    cached = WHEELS / h.hexdigest()[:16]
    WHEELS.parent.mkdir(parents=True, exist_ok=True)
    with open(WHEELS.parent / ".wheels.lock", "w") as lock:  # parallel runs: one builds, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(cached.glob("*.whl"))
        if found:
            return found[0]
        root = tmp_path_factory.mktemp("wheel")
        src = root / "src"
        for name in files:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, src / name)
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"),
                               str(src)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        (built,) = (root / "dist").glob("*.whl")
        shutil.rmtree(WHEELS, ignore_errors=True)  # one cached wheel: the checkout's latest
        cached.mkdir(parents=True)
        return Path(shutil.copy2(built, cached / built.name))


def test_wheel_holds_the_client_packages_and_nothing_else(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops - {n for n in tops if n.endswith(".dist-info")} == set(PACKAGES)
    sources = {str(p.relative_to(REPO_ROOT)) for top in PACKAGES for p in (REPO_ROOT / top).rglob("*.py")
               if str(p.relative_to(REPO_ROOT)) in set(_checkout_files())}
    assert sources <= set(names), f"modules missing from the wheel: {sorted(sources - set(names))}"
    static = {f"clients/gateway/static/{p.name}" for p in (REPO_ROOT / "clients" / "gateway" / "static").iterdir()}
    assert static and static <= set(names), "the gateway's static files are package data"
    assert not [n for n in names if n.endswith((".pyc", ".onnx", ".nemo")) or "__pycache__" in n]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "diarize = clients.diarize.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# ---- the client venv -------------------------------------------------------------------------------
def _wheel_digest(wheel: Path) -> str:
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0" + z.read(name) + b"\0")
    return h.hexdigest()[:16]


def client_venv_python() -> Path:
    """build/venvs/client: ``pip install <checkout>[client]``, rebuilt when pyproject.toml changes (also made in
    the background at the start of a session that runs these tests: tests/fixtures_venvs.py)."""
    return side_venv("client", [f"{REPO_ROOT}[client]"], inputs=[PYPROJECT], quiet=True)


@pytest.fixture(scope="module")
def client_venv(wheel: Path) -> Path:
    """bin/ of build/venvs/client (``client_venv_python``) with this wheel installed over the project
    (``--no-deps``, only when the packaged files changed)."""
    python = client_venv_python()
    venv = python.parent.parent
    stamp = venv / f".project-{_wheel_digest(wheel)}"
    with open(venv.parent / ".client.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                                   str(wheel)], capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
            for old in venv.glob(".project-*"):
                old.unlink()
            stamp.touch()
    return python.parent


def _clean_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIARIZE_URL", "PYTHONHOME")}
    env["COLUMNS"] = "200"  # rich: wide tables in a pipe
    return env


PROBE = r"""
import importlib.metadata as md, importlib.util, json
import numpy as np
import clients, sortformer_triton
from clients.sortformer_client.transport import check_parameters
print(json.dumps({
    "importable": [m for m in %r if importlib.util.find_spec(m) is not None],
    "tritonclient": md.version("tritonclient"), "numpy": np.__version__,
    "files": [clients.__file__, sortformer_triton.__file__],
    "parameters": check_parameters({"onset": np.float64(0.6), "median_filter_frames": np.int64(3)}),
}))
""" % (NOT_IMPORTABLE,)


def test_client_venv_has_the_newest_client_and_no_server_stack(client_venv: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(client_venv / "python"), "-c", PROBE], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["importable"] == [], f"the client venv can import {got['importable']}"
    assert Version(got["tritonclient"]) >= Version("2.52") and Version(got["numpy"]) >= Version("2")
    site = client_venv.parent / "lib"
    assert all(Path(f).is_relative_to(site) for f in got["files"]), f"not the installed packages: {got['files']}"
    assert got["parameters"] == {"onset": "0.6", "median_filter_frames": 3}


@pytest.fixture(scope="module")
def conversation_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    audio, turns = conversation(8.0, n_speakers=2, seed=31)
    path = tmp_path_factory.mktemp("packaging_audio") / "talk.wav"
    soundfile.write(path, audio, 16000, subtype="PCM_16")
    with open(path.with_suffix(".ref.rttm"), "w") as fh:
        for t in turns:
            fh.write(f"SPEAKER talk 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> s{t.speaker} <NA> <NA>\n")
    return path


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_installed_diarize_writes_what_the_library_computes(protocol: str, client_venv: Path, tiny_server,
                                                           conversation_wav: Path, tmp_path: Path) -> None:
    url = tiny_server.http_url if protocol == "http" else tiny_server.grpc_url
    out = tmp_path / "out"
    args = [str(client_venv / "diarize"), str(conversation_wav), "--url", url, "--protocol", protocol,
            "--preset", PRESET, "--out", str(out), "--no-progress"] + (["--no-png"] if protocol == "http" else [])
    done = subprocess.run(args, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    with DiarizationClient(url, protocol=protocol, preset=PRESET) as client:  # this venv: 2.51, numpy 1.26
        result = client.diarize(*load_audio(conversation_wav))
    assert result.finished and result.segments
    reference = tmp_path / "talk.rttm"
    write_rttm(reference, "talk", result.segments, result.speaker_names)
    assert (out / "talk.rttm").read_text() == reference.read_text()

    data = json.loads((out / "talk.json").read_text())
    assert data["server"]["protocol"] == protocol and data["audio"]["sample_rate"] == 16000
    expected = json.loads(json.dumps(result.to_dict(uri="talk")))
    for key in VOLATILE:
        data.pop(key, None)
        expected.pop(key, None)
    assert data == expected
    if protocol == "grpc":
        assert (out / "talk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        _check_eval(client_venv, conversation_wav.with_suffix(".ref.rttm"), out, tmp_path)


def _check_eval(client_venv: Path, ref: Path, hyp: Path, tmp_path: Path) -> None:
    """``diarize eval`` of the installed venv (its pyannote.metrics) scores as this venv's evaluator."""
    from clients.diarize.evaluate import load_and_evaluate

    scores = tmp_path / "scores.json"
    done = subprocess.run([str(client_venv / "diarize"), "eval", "--ref", str(ref), "--hyp", str(hyp),
                           "--json", str(scores)], cwd=tmp_path, env=_clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = json.loads(json.dumps(load_and_evaluate(ref, hyp).as_dict()))
    assert _rounded(json.loads(scores.read_text())) == _rounded(expected)


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
