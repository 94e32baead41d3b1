"""The `decode` role of a disaggregated fleet: `python -m kvfleet.dataplane.roles.decode --config FILE` (see launch.py)."""

from __future__ import annotations

from kvfleet.dataplane.roles.launch import main

if __name__ == "__main__":
    raise SystemExit(main("decode"))
