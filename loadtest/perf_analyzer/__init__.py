"""perf_analyzer sequence-mode sweeps against ``diarizer_<preset>`` (input data + runner)."""
