"""Clients of the Streaming Sortformer Triton service.

- ``clients.sortformer_client``: the typed client library (``DiarizationClient``, ``Stream``) used by the
  ``diarize`` CLI, the tests, load tests and gateways;
- ``clients.diarize``: the ``diarize`` command line (``python -m clients.diarize --help``).
"""
