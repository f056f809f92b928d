"""The ``diarize`` command line: ``python -m clients.diarize --help``.

Commands: run (default: files -> RTTM/JSON/PNG), eval (DER/JER), split (one wav per speaker), live
(microphone or a wav file played in real time). See ``clients.diarize.cli``.
"""
from .cli import main

__all__ = ["main"]
