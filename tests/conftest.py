"""Shared pytest configuration: fixtures live in plugin modules, registered here."""

pytest_plugins = ["tests.fixtures_server", "tests.fixtures_models", "tests.fixtures_venvs"]
