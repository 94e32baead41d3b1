"""The OpenAI-compatible HTTP server (`kvfleet serve`): aiohttp app over any `AsyncEngine`."""

from kvfleet.dataplane.server.app import build_app, start_server

__all__ = ["build_app", "start_server"]
