"""The OpenAI-compatible aiohttp application over any `AsyncEngine`.

    app = build_app(engine, tokenizer, ["smollm2"])
    runner, url = await start_server(app, "127.0.0.1", 8000)

Routes: POST /v1/completions, POST /v1/chat/completions (streaming or not),
GET /v1/models, GET /health, GET /metrics, GET /openapi.json (the API as OpenAPI 3.1). Every error, including unknown
routes and crashes inside a handler, is answered as OpenAI-style JSON and the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from kvfleet.dataplane.engine.api import AsyncEngine, EngineOverloaded
from kvfleet.dataplane.server.errors import APIError
from kvfleet.dataplane.server.handlers import OpenAIHandlers, ServerState, ServerTokenizer
from kvfleet.dataplane.server.metrics import CONTENT_TYPE, ServerMetrics
from kvfleet.dataplane.server.openapi import openapi_document
from kvfleet.dataplane.tracing import SLOTarget, Telemetry

log = logging.getLogger(__name__)

STATE_KEY = web.AppKey("kvfleet_state", ServerState)
MAX_BODY_BYTES = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(
    engine: AsyncEngine,
    tokenizer: ServerTokenizer,
    served_model_names: Iterable[str],
    *,
    variant: str = "",
    slo_classes: Iterable[str] | None = None,
    vocab_size: int | None = None,
    manage_engine: bool = True,
    variants: dict[str, str] | None = None,
    telemetry: Telemetry | None = None,
    slo_targets: dict[str, SLOTarget] | None = None,
    default_slo_class: str | None = None,
    parents: dict[str, str] | None = None,
) -> web.Application:
    """An aiohttp app serving `engine` under the given model names.

    Args:
        engine: any `AsyncEngine` (the real one, or `FakeEngine` in tests).
        tokenizer: encode / decode / apply_chat_template (see `ServerTokenizer`).
        served_model_names: names a request's `model` may use; the first is listed first.
        variant: the ModelVariant name passed to the engine (prefix-cache isolation).
        slo_classes: known SLO class names; a request naming another gets a 400.
            None passes any name through (the engine falls back to its default).
        vocab_size: token-id prompts are checked against it when given.
        manage_engine: start the engine with the app and shut it down on cleanup.
        variants: served model name -> ModelVariant name, when one engine (a router) serves several.
        telemetry: a span per request and unsampled SLO counts (`tracing.configure`); None = none.
        slo_targets, default_slo_class: what each class promises, to count a request attained or not.
        parents: served name of a variant built on another served model (a LoRA adapter) -> that model's
            name; `/v1/models` lists it as the variant's `parent` (null for a base).
    """
    names = list(served_model_names)
    if not names:
        raise ValueError("served_model_names must not be empty")
    if vocab_size is None:
        vocab_size = getattr(tokenizer, "vocab_size", None)
    state = ServerState(
        engine=engine,
        tokenizer=tokenizer,
        served_model_names=names,
        metrics=ServerMetrics(engine.stats),
        variant=variant,
        slo_classes=None if slo_classes is None else frozenset(slo_classes),
        vocab_size=vocab_size if isinstance(vocab_size, int) else None,
        variants=variants,
        telemetry=telemetry,
        slo_targets=slo_targets,
        default_slo_class=default_slo_class,
        parents=parents,
    )
    app = web.Application(middlewares=[_errors_and_counts], client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = state
    handlers = OpenAIHandlers(state)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/v1/chat/completions", handlers.chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    if manage_engine:
        app.on_startup.append(_start_engine)
        app.on_cleanup.append(_stop_engine)
    return app


async def drain(app: web.Application, drain_s: float) -> int:
    """Stop admitting (503, /health fails) and wait up to `drain_s` for in-flight requests; returns how
    many were still running when the time ran out."""
    state = app[STATE_KEY]
    state.draining = True
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        s = state.engine.stats()
        if s.num_running + s.num_waiting == 0 and state.in_flight == 0:
            return 0
        await asyncio.sleep(0.1)
    s = state.engine.stats()
    return s.num_running + s.num_waiting


async def start_server(app: web.Application, host: str = "127.0.0.1", port: int = 8000) -> tuple[web.AppRunner, str]:
    """Serve `app` on host:port (0 = any free port); returns the runner and the base URL.

    Handler cancellation is on: when a client disconnects, its handler task is
    cancelled, which aborts its request in the engine.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}"


# -- routes ---------------------------------------------------------------------


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    created = int(time.time())
    parents = state.parents or {}
    data = [{"id": name, "object": "model", "created": created, "owned_by": "kvfleet",
             "max_model_len": state.engine.max_model_len, "parent": parents.get(name)}
            for name in state.served_model_names]
    return web.json_response({"object": "list", "data": data})


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    s = state.engine.stats()
    return web.json_response({"status": "draining" if state.draining else "ok", "num_running": s.num_running,
                              "num_waiting": s.num_waiting}, status=503 if state.draining else 200)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[STATE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[STATE_KEY].served_model_names))


async def _start_engine(app: web.Application) -> None:
    await app[STATE_KEY].engine.start()


async def _stop_engine(app: web.Application) -> None:
    await app[STATE_KEY].engine.shutdown()


@web.middleware
async def _errors_and_counts(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OpenAI-style JSON for every error; count responses by endpoint and status."""
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "unmatched"
    state = request.app[STATE_KEY]
    counted = request.method == "POST"
    try:
        if counted and state.draining:  # scale-down: in-flight work finishes, new work goes elsewhere
            counted = False
            raise APIError("This server is draining (shutting down); send the request to another replica.",
                           status=503, type="server_error", code="draining")
        if counted:
            state.in_flight += 1
        response = await handler(request)
    except APIError as e:
        response = e.response()
    except EngineOverloaded as e:  # shed: the client should come back later
        response = APIError(str(e), status=429, type="rate_limit_error", code="overloaded").response()
        response.headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "not_found_error" if e.status == 404 else "invalid_request_error"
        response = APIError(f"{e.reason}: {request.method} {request.path}", status=e.status, type=kind,
                            code=str(e.status)).response()
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = APIError("The server had an error while processing your request.", status=500,
                            type="server_error").response()
    finally:
        if counted:
            state.in_flight -= 1
    state.metrics.requests.labels(endpoint, str(response.status)).inc()
    return response
