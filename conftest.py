"""Repo-wide pytest setup: the real-control-plane fixtures live in e2e/pytest_plugin.py."""

pytest_plugins = ["e2e.pytest_plugin"]
