"""Dependencies point one way (DESIGN.md): nothing used at serving time, by clients or by load tests
imports export, torch or nemo; the shared package imports none of the project's other packages."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "sortformer_triton": {"export", "clients", "loadtest", "python_backend", "torch", "nemo"},
    "python_backend": {"export", "clients", "loadtest", "torch", "nemo"},
    "clients": {"export", "loadtest", "torch", "nemo"},
    "loadtest": {"export", "torch", "nemo"},
}
# Narrow exceptions (a folder inside a package: the names it may import after all). clients/curator holds
# NeMo Curator stages: Curator's AudioTask carries per-speaker waveforms as torch tensors (as Curator's own
# SpeakerSeparationStage does) and torch is a dependency of Curator itself; they run in the Curator side
# venv (clients/curator/env.py), never in the serving one. torch only: never nemo, never export.
ALLOWED = {
    "clients/curator": {"torch"},
}


def _allowed(path: Path, name: str) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(name in names and rel.startswith(folder + "/") for folder, names in ALLOWED.items())


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}"
           for p in sorted((ROOT / package).rglob("*.py"))
           for name, line in _imports(p) if name in FORBIDDEN[package] and not _allowed(p, name)]
    assert not bad, "\n".join(bad)
