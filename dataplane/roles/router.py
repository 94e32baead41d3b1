"""The `router` role: the fleet's OpenAI endpoint over its prefill and decode pods.

    python -m kvfleet.dataplane.roles.router --config /etc/kvfleet/router.json [--host IP] [--port 8000]
    python -m kvfleet.dataplane.roles.router --config router.json --endpoint prefill=base@127.0.0.1:50051 \\
        --endpoint decode=base@127.0.0.1:50052 --endpoint mempool=@127.0.0.1:50060
                                                        # a static list instead of the Kubernetes API

`router.json` is rendered by the operator (`fleet_config_data`): the fleet, its namespace, the SLO
classes (which may be shed under overload) and, per served model, its variant, weights (for the
tokenizer) and the gRPC port of its pods, the memory pool's port when the fleet has one, and how prefill
pods are picked (`routing`: mode round-robin | load | prefix, weights; `routing.py`). The HTTP surface, errors and SSE behaviour are exactly
`kvfleet serve`'s (`server/app.py`); only the engine behind it differs (`DisaggregatedEngine`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("kvfleet.roles.router")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvfleet dataplane --role router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="router.json")
    p.add_argument("--host", default=os.environ.get("POD_IP", "0.0.0.0"), help="bind address (default: $POD_IP)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's; 0 = any free)")
    p.add_argument("--endpoint", action="append", default=[], metavar="ROLE=VARIANT@HOST:PORT",
                   help="a static prefill/decode endpoint (repeatable); none: watch the fleet's pods")
    p.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request of a non-sheddable class waits for KV room before a 429")
    p.add_argument("--routing", choices=("round-robin", "load", "prefix"), default=None,
                   help="how prefill pods are picked (default: router.json's routing.mode, else prefix)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def load_tokenizer(models: list[dict[str, Any]]) -> Any:
    """One tokenizer for every served model; models whose tokenizers differ are refused."""
    from kvfleet.dataplane.model.tokenizer import Tokenizer
    from kvfleet.dataplane.roles.engine import resolve_model_dir

    dirs = [resolve_model_dir(m["weightsDir"], {"spec": {"base": {"builtin": m.get("builtin")}}}) for m in models]
    digests = {hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest() for d in dirs}
    if len(digests) > 1:
        raise SystemExit("router: the served models use different tokenizers; one router serves one tokenizer "
                         f"({', '.join(m['model'] for m in models)})")
    return Tokenizer.from_dir(str(dirs[0]))


async def serve(args: argparse.Namespace) -> None:
    from kvfleet.dataplane.roles.disaggregated import DisaggregatedEngine, RouterPolicy
    from kvfleet.dataplane.roles.discovery import KubernetesDiscovery, StaticDiscovery
    from kvfleet.dataplane.roles.routing import RoutingPolicy
    from kvfleet.dataplane.server.app import build_app, drain, start_server

    cfg = json.loads(args.config.read_text())
    models = cfg["models"]
    if not models:
        raise SystemExit("router: router.json lists no models")
    classes = cfg.get("sloClasses", [])
    if args.endpoint:
        discovery: Any = StaticDiscovery.parse(args.endpoint)
    else:
        port = models[0]["roles"]["prefill"]["grpcPort"]
        pool = cfg.get("mempool") or {}
        discovery = KubernetesDiscovery(cfg["namespace"], cfg["fleet"], port, pool_port=pool.get("port"))
    policy = RouterPolicy(sheddable=frozenset(c["name"] for c in classes if c.get("sheddable")),
                          default_slo_class=cfg.get("defaultSloClass"), queue_timeout_s=args.queue_timeout,
                          default_max_model_len=int(cfg.get("maxModelLen") or 2048),
                          max_queued_requests=int(cfg.get("maxQueuedRequests") or 256))
    routing = RoutingPolicy.from_dict({**(cfg.get("routing") or {}), **({"mode": args.routing} if args.routing else {})})
    engine = DisaggregatedEngine(discovery, [m["variant"] for m in models], policy, routing=routing,
                                 served_by={m["variant"]: m["servedBy"] for m in models if m.get("servedBy")})
    from kvfleet.dataplane import tracing

    telemetry = tracing.configure("router")
    telemetry.observe_router(lambda: engine.queued, lambda: engine.picker.hit_rate,
                             lambda: len(engine.picker.index))
    targets = {c["name"]: tracing.SLOTarget(float(c["ttftMs"]), float(c["tpotMs"])) for c in classes
               if "ttftMs" in c and "tpotMs" in c}
    app = build_app(engine, load_tokenizer(models), [m["model"] for m in models],
                    slo_classes=[c["name"] for c in classes] or None,
                    variants={m["model"]: m["variant"] for m in models}, telemetry=telemetry,
                    slo_targets=targets, default_slo_class=cfg.get("defaultSloClass"),
                    parents={m["model"]: m["parent"] for m in models if m.get("parent")})
    runner, url = await start_server(app, args.host, cfg.get("port", 8000) if args.port is None else args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"kvfleet router: listening on {url}", flush=True)
    try:
        await stop.wait()
        await drain(app, float(os.environ.get("KVFLEET_DRAIN_SECONDS", "0")))
    finally:
        await runner.cleanup()
        telemetry.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
