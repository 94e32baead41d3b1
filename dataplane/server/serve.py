"""`kvfleet serve`: one process, router + engine, an OpenAI-compatible API on a laptop.

    kvfleet serve --model /models/my-llama --served-model-name llama --port 8000
    kvfleet serve --model smollm2            # the bundled SmolLM2-135M-Instruct (converted once, cached)

Loads the tokenizer and an `AsyncLLMEngine` from an HF-format directory, serves
until SIGTERM or SIGINT, then stops accepting connections, ends in-flight
requests (finish_reason "abort") and stops the engine thread.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from kvfleet.dataplane.config import AdapterConfig, EngineConfig, SLOClassConfig, tokenizer_dir

log = logging.getLogger("kvfleet.serve")

SMOLLM2_ALIAS = "smollm2"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvfleet serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"HF-format model directory, or '{SMOLLM2_ALIAS}' for the bundled SmolLM2-135M-Instruct")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: 'smollm2' or the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the URL is logged)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests batched together at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step (prefill chunk)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion limit (default: the model's)")
    p.add_argument("--kv-cache-mb", type=float, default=None, help="KV-cache memory in MiB (default: the engine's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a PEFT LoRA adapter directory as model NAME on the base (repeatable)")
    p.add_argument("--fine-tune", default=None, metavar="DIR",
                   help="serve a full fine-tune: its HF directory's weights replace --model's (tokenizer: "
                        "its own if present, else --model's)")
    p.add_argument("--adapter-memory-mb", type=float, default=256, help="resident LoRA adapters at most (LRU)")
    p.add_argument("--slo-class", action="append", default=[], metavar="NAME:TTFT_MS:TPOT_MS[:PRIORITY]",
                   help="declare an SLO class (repeatable); the first is the default")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def resolve_model_dir(model: str) -> tuple[Path, str]:
    """(model directory, default served name); `smollm2` converts the bundled GGUF on first use."""
    if model == SMOLLM2_ALIAS and not Path(model).is_dir():
        from kvfleet.dataplane.model.smollm2 import smollm2_dir

        return Path(smollm2_dir()), SMOLLM2_ALIAS
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"kvfleet serve: {path} is not an HF-format model directory (no config.json)")
    return path, path.resolve().name


def parse_slo_class(spec: str) -> SLOClassConfig:
    """NAME:TTFT_MS:TPOT_MS[:PRIORITY] -> SLOClassConfig."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"kvfleet serve: --slo-class {spec!r}: expected NAME:TTFT_MS:TPOT_MS[:PRIORITY]")
    priority = int(parts[3]) if len(parts) == 4 else 0
    return SLOClassConfig(parts[0], float(parts[1]), float(parts[2]), priority=priority)


def parse_lora(spec: str) -> AdapterConfig:
    """NAME=DIR (a PEFT adapter directory) -> AdapterConfig (its rank and alpha are read from the directory)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"kvfleet serve: --lora {spec!r}: expected NAME=DIR")
    from kvfleet.dataplane.model.lora import AdapterError, read_adapter_config

    try:
        declared = read_adapter_config(path)
    except AdapterError as e:
        raise SystemExit(f"kvfleet serve: --lora {spec!r}: {e}") from e
    return AdapterConfig(name, path, declared.rank, declared.alpha)  # checked again by the engine


def build_config(args: argparse.Namespace, model_dir: Path, variant: str) -> EngineConfig:
    classes = tuple(parse_slo_class(s) for s in args.slo_class)
    return EngineConfig(
        fine_tune_dir=args.fine_tune,
        adapters=tuple(parse_lora(s) for s in args.lora),
        adapter_memory_bytes=int(args.adapter_memory_mb * 2**20),
        model_dir=str(model_dir),
        variant=variant,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_bytes=int(args.kv_cache_mb * 2**20) if args.kv_cache_mb else None,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        slo_classes=classes,
        default_slo_class=classes[0].name if classes else None,
    )


async def run_server(config: EngineConfig, served_model_names: list[str], host: str, port: int,
                     role: str = "engine") -> None:
    """Load the engine for `config`, serve the OpenAI API on host:port until SIGTERM/SIGINT, shut down.

    `kvfleet serve` and the colocated `engine` role both run through here.
    """
    from kvfleet.dataplane.engine.async_engine import AsyncLLMEngine
    from kvfleet.dataplane.model.tokenizer import Tokenizer
    from kvfleet.dataplane.server.app import build_app, drain, start_server

    log.info("loading %s", config.weights_dir)
    tokenizer = Tokenizer.from_dir(tokenizer_dir(config))
    engine = AsyncLLMEngine.from_config(config)
    slo_names = [c.name for c in config.slo_classes] or None
    from kvfleet.dataplane import tracing

    telemetry = tracing.configure(role)
    telemetry.observe_engine(engine.stats)
    targets = {c.name: tracing.SLOTarget(c.ttft_ms, c.tpot_ms) for c in config.slo_classes}
    # LoRA variants: listed after the base, each named by its served name, its parent the base's first name
    adapters = {a.model_name: a.name for a in config.adapters}
    names = list(served_model_names) + list(adapters)
    app = build_app(engine, tokenizer, names, variant=config.variant, slo_classes=slo_names,
                    telemetry=telemetry, slo_targets=targets, default_slo_class=config.default_slo_class,
                    variants={**{n: config.variant for n in served_model_names}, **adapters} if adapters else None,
                    parents={n: served_model_names[0] for n in adapters} if served_model_names else None)
    runner, url = await start_server(app, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s as %s at %s (max_model_len %d, device %s)", config.weights_dir,
             ", ".join(names), url, engine.max_model_len, engine.engine.device)
    print(f"kvfleet serve: listening on {url}", flush=True)
    try:
        await stop.wait()
        drain_s = float(os.environ.get("KVFLEET_DRAIN_SECONDS", "0"))
        if drain_s > 0:  # a scale-down: stop admitting, let in-flight requests finish
            log.info("draining for up to %.0fs", drain_s)
            left = await drain(app, drain_s)
            log.info("drained" if not left else "drain time over with %d requests still running", left)
    finally:
        log.info("shutting down")
        await runner.cleanup()  # closes connections, then the app's cleanup stops the engine
        telemetry.shutdown()  # flushes the last spans and counts
        log.info("stopped")


async def serve(args: argparse.Namespace) -> None:
    """`kvfleet serve`: build the EngineConfig from flags and run the server."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model_dir, default_name = resolve_model_dir(args.model)
    names = args.served_model_name or [default_name]
    await run_server(build_config(args, model_dir, names[0]), names, args.host, args.port, role="serve")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    asyncio.run(serve(args))
    return 0
