"""NeMo Curator stages backed by this project's Triton server (docs/curator.md).

``TritonSortformerDiarizationStage`` (Curator's ``InferenceSortformerStage``) and
``TritonSpeakerSeparationStage`` (Curator's ``SpeakerSeparationStage``) send each batch of recordings to one
shared Triton server (or a proxy in front of several) as concurrent sequences, instead of loading NeMo and a
model in every Ray worker; ``python -m clients.curator`` runs a pipeline with them.

Modules: ``core`` (the logic: numpy and our client only, importable anywhere), ``stages`` (the Curator
stages: import Curator and torch, run in the Curator venv), ``env`` (that venv), ``__main__`` (the CLI).
The stage classes are importable from here too (``from clients.curator import TritonSpeakerSeparationStage``),
which imports Curator on first use.
"""
from __future__ import annotations

from typing import Any

_STAGES = ("TritonSortformerDiarizationStage", "TritonSpeakerSeparationStage", "SpeakerAudioWriterStage")
__all__ = list(_STAGES)


def __getattr__(name: str) -> Any:
    if name in _STAGES:
        from . import stages

        return getattr(stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
