"""Session fixtures: the tiny random-init model exported once, and a real local tritonserver serving it.

- ``tiny_repository``: ``export_repository`` of ``load_model('tiny', seed=0)`` for every preset, plus the tiny
  offline Sortformer v1 (``diarizer_offline``), into a session temp dir (both flavours; ~35 s on 2 cores, NeMo
  import included);
- ``tiny_server``: the embedded tritonserver (nvidia-pytriton's 2.51) serving ``<repository>/local``,
  started once per session by ``tests.fixtures_server``'s factory (so these tests carry the ``triton``
  mark);
- ``tiny_reference_model``: a second ``load_model('tiny', seed=0)``, i.e. the same weights as the export
  (random init is seeded), kept apart from the exported instance so that reference runs (NeMo's own
  streaming loop) cannot be affected by anything the export did to its model object.

Export needs NeMo and torch (requirements-export.txt); where they are missing these fixtures skip.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Sequence

import pytest

from sortformer_triton import contract, repository
from sortformer_triton.local_server import LocalTritonServer
from sortformer_triton.presets import PRESETS, Preset

TINY_SOURCE = "tiny"
TINY_SEED = 0


def _require_export_dependencies() -> None:
    missing = [m for m in ("torch", "nemo") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"exporting the tiny model needs {', '.join(missing)} (pip install -r requirements-export.txt)")


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the exported tiny model's repository (``local/`` and ``production/`` under it)."""
    _require_export_dependencies()
    from export.__main__ import export_repository
    from export.models import load_model

    out = tmp_path_factory.mktemp("tiny_repository")
    model = load_model(TINY_SOURCE, seed=TINY_SEED)
    export_repository(model, TINY_SOURCE, out, list(PRESETS.values()), ["local", "production"],
                      offline_model=load_model(TINY_SOURCE, seed=TINY_SEED, offline=True), offline_source=TINY_SOURCE)
    return out


@pytest.fixture(scope="session")
def tiny_export_info(tiny_repository: Path) -> Dict[str, Any]:
    return json.loads((tiny_repository / "local" / "export_info.json").read_text())


@pytest.fixture(scope="session")
def tiny_server(tiny_repository: Path, triton_server_session) -> LocalTritonServer:
    """A running tritonserver serving every preset of the tiny model (``.grpc_url`` / ``.http_url``)."""
    return triton_server_session(tiny_repository / "local")


@pytest.fixture(scope="session")
def tiny_offline_reference_model():
    """The exported offline model's weights again (same seed), for NeMo's own offline forward."""
    _require_export_dependencies()
    from export.models import load_model

    return load_model(TINY_SOURCE, seed=TINY_SEED, offline=True)


@pytest.fixture(scope="session")
def tiny_reference_model():
    """The exported weights again (same seed), for NeMo's own streaming loop."""
    _require_export_dependencies()
    from export.models import load_model

    return load_model(TINY_SOURCE, seed=TINY_SEED)


def preset_repository(tiny_repository: Path, dest: Path, presets: Sequence[Preset], emb_dim: int,
                      idle_seconds: int, **options: Any) -> Path:
    """A copy of the tiny model's local repository with only ``presets`` (fewer models: a server that
    starts faster), its configs regenerated with the sequence idle timeout and ``options``."""
    root = dest / "local"
    keep = {contract.POSTPROCESSOR, contract.ADMISSION} | {name for p in presets for name in contract.preset_models(p)}
    shutil.copytree(tiny_repository / "local", root,
                    ignore=lambda d, names: [n for n in names if Path(d) == tiny_repository / "local"
                                             and (Path(d) / n).is_dir() and n not in keep])
    repository.write_configs(root, "local", presets, emb_dim, sequence_idle_seconds=idle_seconds, **options)
    return root
