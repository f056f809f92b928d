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
           for name, line in _imports(p) if name in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)
