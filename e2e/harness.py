"""Small helpers every cluster-facing script and test shares: polling, SA kubeconfigs, live pod servers."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90.0, interval: float = 0.3) -> Any:
    """Poll `check` until it returns something truthy (an AssertionError counts as not yet); that value.

    Fails with `what` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def token_kubeconfig(admin_kubeconfig: Path | str, token: str, path: Path) -> Path:
    """A kubeconfig for the admin kubeconfig's cluster that authenticates with `token` (e.g. a bound SA token)."""
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    server = admin["clusters"][0]["cluster"]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": server}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
    }))
    return path


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether GET `url` returns 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def serving_pod_ips(pods: Iterable[dict[str, Any]], port: int = 8080, path: str = "/health") -> list[str]:
    """IPs of live pods (no deletionTimestamp) whose server answers http://IP:port/path.

    Checked directly: on simulated nodes KWOK may report a run-locally pod Ready before its process listens.
    """
    ips = [p["status"].get("podIP") for p in pods if not p["metadata"].get("deletionTimestamp")]
    return sorted(ip for ip in ips if ip and answers(f"http://{ip}:{port}{path}"))


def metric_value(base_url: str, name: str, timeout: float = 10.0) -> float:
    """One unlabelled sample of a Prometheus text exposition at `base_url`/metrics (0.0 when absent)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0
