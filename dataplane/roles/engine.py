"""The colocated `engine` role: one pod runs prefill and decode and serves the OpenAI API.

    python -m kvfleet.dataplane.roles.engine --config /etc/kvfleet/engine.json [--host IP] [--port 8080]

The operator renders `engine.json` (an `EngineConfig`) and `variant.json` (the
ModelVariant: served name, weight source) into the fleet's ConfigMap and mounts
both side by side. A builtin weight source is materialised into the local cache
on first start when the image does not already hold it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("kvfleet.roles.engine")

DEFAULT_PORT = 8080


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvfleet.dataplane.roles.engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="EngineConfig JSON (variant.json beside it)")
    p.add_argument("--host", default=os.environ.get("POD_IP", "0.0.0.0"), help="bind address (default: $POD_IP)")
    p.add_argument("--port", type=int, default=int(os.environ.get("KVFLEET_HTTP_PORT", DEFAULT_PORT)))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def read_variant(config_path: Path) -> dict[str, Any]:
    """variant.json next to the engine config ({} when absent: a hand-written config)."""
    path = config_path.parent / "variant.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_model_dir(model_dir: str, variant: dict[str, Any]) -> Path:
    """The weights directory to load: as configured, or the materialised builtin."""
    if (Path(model_dir) / "config.json").is_file():
        return Path(model_dir)
    builtin = variant.get("spec", {}).get("base", {}).get("builtin")
    if builtin:
        from kvfleet.dataplane.model.builtin import builtin_model_dir

        return builtin_model_dir(builtin)
    raise SystemExit(f"engine role: {model_dir} holds no HF-format model (no config.json)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kvfleet.dataplane.config import EngineConfig
    from kvfleet.dataplane.server.serve import run_server

    config = EngineConfig.from_json(args.config.read_text())
    variant = read_variant(args.config)
    model_dir = resolve_model_dir(config.model_dir, variant)
    config = dataclasses.replace(config, model_dir=str(model_dir))
    # a group serving only LoRA variants (their base is no variant of the fleet) lists no base name
    served = variant.get("servedModelName")
    names = [served] if served else ([] if config.adapters and variant else [config.variant or model_dir.name])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    asyncio.run(run_server(config, names, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
