"""A discrete-event fleet simulator for comparing autoscaling controllers (a tool: nothing imports it).

`kvfleet simulate --trace FILE` replays a request trace (see `trace.py`) against
simulated engine pods (`fleet.py`, costs from `profiles.py`) under kvfleet's
planner and two baselines (`controllers.py`) and prints a table (`cli.py`).
"""
