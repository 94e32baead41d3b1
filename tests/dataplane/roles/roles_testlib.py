"""Start the disaggregated roles as real processes on loopback (as the pod runner would) and stop them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from kvfleet.dataplane.config import CachePolicyConfig, EngineConfig

from e2e.processes import LoggedProcess

RoleProcess = LoggedProcess  # one role process on loopback, as the pod runner would run it


def engine_config_file(tmp: Path, model_dir: Path, variant: str, cp: CachePolicyConfig | None = None,
                       **kw: Any) -> Path:
    cfg = EngineConfig(**{"model_dir": str(model_dir), "variant": variant, "block_size": 4, "max_num_seqs": 8,
                          "max_num_batched_tokens": 512, "cache_policy": cp or CachePolicyConfig(), **kw})
    path = tmp / f"engine-{variant}-{len(list(tmp.glob('engine-*.json')))}.json"
    path.write_text(cfg.to_json())
    return path


def role(tmp: Path, name: str, role_name: str, config: Path, env: dict[str, str] | None = None) -> RoleProcess:
    argv = [sys.executable, "-m", f"kvfleet.dataplane.roles.{role_name}", "--config", str(config),
            "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--threads", "1"]
    return RoleProcess(name, argv, tmp / f"{name}.log", r"gRPC on (\S+:\d+)", env or {})


def router(tmp: Path, model: str, variant: str, model_dir: Path, endpoints: list[str],
           sheddable: tuple[str, ...] = (), extra: list[str] | None = None, env: dict[str, str] | None = None,
           targets: dict[str, tuple[float, float]] | None = None) -> RoleProcess:
    """targets: per SLO class, (TTFT ms, TPOT ms) it promises (the router then counts attainment)."""
    t = targets or {}
    cfg = {"fleet": "test", "namespace": "default", "port": 0, "defaultSloClass": "interactive",
           "sloClasses": [{"name": c, "sheddable": shed,
                           **({"ttftMs": t[c][0], "tpotMs": t[c][1]} if c in t else {})}
                          for c, shed in [("interactive", False), *((s, True) for s in sheddable)]],
           "models": [{"model": model, "variant": variant, "weightsDir": str(model_dir),
                       "roles": {"prefill": {"grpcPort": 0}, "decode": {"grpcPort": 0}}}]}
    path = tmp / f"router-{len(list(tmp.glob('router-*.json')))}.json"
    path.write_text(json.dumps(cfg))
    argv = [sys.executable, "-m", "kvfleet.dataplane.roles.router", "--config", str(path), "--host", "127.0.0.1",
            "--port", "0"] + [f"--endpoint={e}" for e in endpoints] + (extra or [])
    return RoleProcess("router", argv, tmp / f"router-{len(endpoints)}-{time.monotonic_ns()}.log",
                       r"listening on (http://\S+)", env or {})


def start_all(*procs: RoleProcess) -> None:
    """Start every process first (they load in parallel), then wait for each."""
    for p in procs:
        p.start()
    for p in procs:
        p.wait_ready()
