"""Shared, dependency-light logic for serving Streaming Sortformer on Triton.

This package is imported by ``export``, ``python_backend``, ``clients``, ``loadtest`` and the tests.
It imports none of them, and never imports torch or nemo: only numpy (and, in ``repository``,
tritonclient's protobuf definitions).
"""
