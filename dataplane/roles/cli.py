"""`kvfleet dataplane --role router|prefill|decode|engine|mempool --config FILE [role flags]`: one fleet role."""

from __future__ import annotations

import importlib
import sys

ROLES = ("router", "prefill", "decode", "engine", "mempool")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    role = None
    for i, a in enumerate(argv):
        if a == "--role" and i + 1 < len(argv):
            role = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--role="):
            role = a.split("=", 1)[1]
            del argv[i]
            break
    if role not in ROLES:
        print(f"kvfleet dataplane: --role must be one of {', '.join(ROLES)} (got {role!r})", file=sys.stderr)
        return 2
    module = importlib.import_module(f"kvfleet.dataplane.roles.{role}")
    if role in ("prefill", "decode"):
        return int(module.main(role, argv) or 0)
    return int(module.main(argv) or 0)
