"""What the prefill and decode entry points share: flags, config loading, serving until SIGTERM.

    python -m kvfleet.dataplane.roles.prefill --config /etc/kvfleet/engine.json [--host IP] [--grpc-port 50051]
    python -m kvfleet.dataplane.roles.decode  --config /etc/kvfleet/engine.json [--host IP] [--grpc-port 50051]

The operator renders the role's `EngineConfig` as /etc/kvfleet/engine.json and the variant beside it;
the gRPC contracts are `rpc/kvfleet.proto`. /health on the HTTP port answers the pod's probes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("kvfleet.roles")

GRPC_PORT = 50051
HTTP_PORT = 8080


def parse_args(role: str, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"kvfleet dataplane --role {role}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="EngineConfig JSON (variant.json beside it)")
    p.add_argument("--host", default=os.environ.get("POD_IP", "0.0.0.0"), help="bind address (default: $POD_IP)")
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("KVFLEET_GRPC_PORT", GRPC_PORT)))
    p.add_argument("--http-port", type=int, default=int(os.environ.get("KVFLEET_HTTP_PORT", HTTP_PORT)),
                   help="/health for probes (0 = any free port)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def load_engine(config_path: Path) -> Any:
    """The role's `AsyncLLMEngine`, its weights resolved as the colocated role resolves them."""
    from kvfleet.dataplane.config import EngineConfig
    from kvfleet.dataplane.engine.async_engine import AsyncLLMEngine
    from kvfleet.dataplane.roles.engine import read_variant, resolve_model_dir

    config = EngineConfig.from_json(config_path.read_text())
    config.cache_policy.check_servable(disaggregated=True)
    model_dir = resolve_model_dir(config.model_dir, read_variant(config_path))
    return AsyncLLMEngine.from_config(dataclasses.replace(config, model_dir=str(model_dir)))


async def serve(role: str, args: argparse.Namespace) -> None:
    from kvfleet.dataplane import tracing
    from kvfleet.dataplane.roles import wire
    from kvfleet.dataplane.roles.engine import read_variant
    from kvfleet.dataplane.roles.pool_client import GrpcPoolClient
    from kvfleet.dataplane.roles.pool_use import PoolAccess
    from kvfleet.dataplane.roles.services import DecodeService, PrefillService
    from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

    engine = load_engine(args.config)
    await engine.start()
    telemetry = tracing.configure(role)
    telemetry.observe_engine(engine.stats)
    # the pool's shards come with each call (the router discovers them); the family namespaces its keys
    family = read_variant(args.config).get("spec", {}).get("family") or engine.engine.config.variant
    pool = PoolAccess(engine, GrpcPoolClient(timeout_s=2.0), family)
    if role == "prefill":
        servicers = [(pb_grpc.add_PrefillServicer_to_server,
                      PrefillService(engine, corrupt_for_test=os.environ.get("KVFLEET_TEST_CORRUPT_KV") == "1",
                                     telemetry=telemetry, pool=pool))]
    else:
        servicers = [(pb_grpc.add_DecodeServicer_to_server, DecodeService(engine, telemetry, pool=pool))]
    server, port = await wire.start_grpc(servicers, args.host, args.grpc_port)
    health = await wire.start_health(args.host, args.http_port, lambda: engine.error is None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"kvfleet {role}: gRPC on {args.host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        # a scale-down: no new calls (decode refuses reservations), in-flight ones finish within the drain time
        await server.stop(grace=float(os.environ.get("KVFLEET_DRAIN_SECONDS", "5")))
        await health.cleanup()
        await pool.drain()
        await pool.client.close()
        await engine.shutdown()
        telemetry.shutdown()


def main(role: str, argv: list[str] | None = None) -> int:
    args = parse_args(role, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    asyncio.run(serve(role, args))
    return 0
