"""The `kvfleet` command: one entry point, one module per sub-command.

Each sub-command lives next to the code it drives and exposes `main(argv)`;
it is imported only when invoked, so `kvfleet operator` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("kvfleet.operator.__main__", "run the kopf operator against the current kubeconfig"),
    "serve": (
        "kvfleet.dataplane.server.serve",
        "serve a model with an OpenAI-compatible API (router + engine in one process)",
    ),
    "dataplane": (
        "kvfleet.dataplane.roles.cli",
        "run one role of a fleet: --role router|prefill|decode|engine|mempool --config FILE",
    ),
    "model": ("kvfleet.dataplane.model.cli", "model tools: import-gguf FILE OUT_DIR, make-tiny OUT_DIR"),
    "simulate": (
        "kvfleet.simulate.cli",
        "replay a request trace on a simulated fleet under kvfleet's planner, HPA and KEDA",
    ),
    "eval-cache": (
        "kvfleet.tools.eval_cache",
        "measure KV cache policies: bytes/token, perplexity, passkey, tok/s",
    ),
    "train-lookahead": (
        "kvfleet.tools.lookahead_train",
        "train a LookaheadKV module (learned eviction scores) on a model's own attention (cached)",
    ),
    "profile-sharing": (
        "kvfleet.tools.profile_sharing",
        "measure cross-variant KV reuse per layer and recommend layers to recompute (DroidSpeak)",
    ),
}


def usage() -> str:
    lines = ["usage: kvfleet COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kvfleet: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
