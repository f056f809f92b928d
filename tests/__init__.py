"""Tests of the Sortformer Triton serving project."""
