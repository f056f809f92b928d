"""Load tests and benchmarks for the Sortformer diarization ensembles (perf_analyzer, locust, report).

``loadtest`` imports the shared package (``sortformer_triton``) and, for the paced users, the client
library (``clients.sortformer_client``). It never imports ``export``: where a repository must be
exported it runs ``python -m export`` as a subprocess (``loadtest.models``); ``loadtest.report``'s
in-process ONNX baseline is the one exception and says so.
"""
