"""`kvfleet model ...`: import a GGUF Llama, write a tiny test model, locate SmolLM2, fine-tune it."""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvfleet model", description="model tools")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-gguf", help="convert a GGUF Llama file into an HF-format directory")
    imp.add_argument("gguf_file")
    imp.add_argument("out_dir")
    imp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                     help="dtype of the written (dequantized) weights (default: bfloat16)")
    tiny = sub.add_parser("make-tiny", help="write a deterministic random tiny Llama (HF format)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default 2)")
    tiny.add_argument("--hidden", type=int, default=None, help="hidden_size (default 64)")
    sub.add_parser("smollm2", help="convert (once) and print the cached SmolLM2-135M-Instruct directory")
    sub.add_parser("finetune", add_help=False,
                   help="train (once, cached) LoRA adapters and full fine-tunes of SmolLM2; see --help")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kvfleet model`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["finetune"]:  # its own flags (kvfleet/tools/finetune.py: the training is a tool)
        from kvfleet.tools.finetune import main as finetune_main

        return finetune_main(argv[1:])
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    if args.command == "import-gguf":
        from .gguf_import import GGUFImportError, import_gguf

        try:
            out = import_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
        except (GGUFImportError, NotImplementedError, FileExistsError, FileNotFoundError) as e:
            print(f"kvfleet model import-gguf: {e}", file=sys.stderr)
            return 1
        print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    elif args.command == "make-tiny":
        from .tiny import write_tiny_llama

        overrides = {}
        if args.layers is not None:
            overrides["num_hidden_layers"] = args.layers
        if args.hidden is not None:
            overrides["hidden_size"] = args.hidden
        print(f"wrote {write_tiny_llama(args.out_dir, seed=args.seed, **overrides)}")
    elif args.command == "smollm2":
        from .smollm2 import SmolLM2Unavailable, smollm2_dir

        try:
            print(smollm2_dir())
        except SmolLM2Unavailable as e:
            print(f"kvfleet model smollm2: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
