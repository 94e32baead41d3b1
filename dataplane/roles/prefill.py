"""The `prefill` role of a disaggregated fleet: `python -m kvfleet.dataplane.roles.prefill --config FILE` (see launch.py)."""

from __future__ import annotations

from kvfleet.dataplane.roles.launch import main

if __name__ == "__main__":
    raise SystemExit(main("prefill"))
