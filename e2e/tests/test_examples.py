"""The CRDs install on a real apiserver; every example is accepted and every invalid one rejected.

Each ``examples/invalid/*.yaml`` starts with ``# expect-error: <substring>`` (and may add
``# expect-path: <field path>``); the apiserver's rejection must contain both.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
VALID = sorted((REPO / "examples").glob("*.yaml"))
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))


def expectations(path: Path) -> dict[str, str]:
    """The ``# expect-<what>: <text>`` header lines of an invalid example."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line.lstrip("# ").partition(":")
        if sep and key.startswith("expect-"):
            out[key.removeprefix("expect-")] = value.strip()
    return out


@pytest.fixture(scope="module")
def examples_ns(cluster):
    """CRDs applied and Established, and a namespace for the examples."""
    crds = sorted((REPO / "crds").glob("*.yaml"))
    assert crds, "no CRDs in crds/"
    for crd in crds:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *[f"crd/{p.stem.split('_', 1)[1]}.kvfleet.io" for p in crds])
    ns = f"examples-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_there_are_examples():
    assert VALID and INVALID


@pytest.mark.parametrize("example", VALID, ids=lambda p: p.name)
def test_example_is_accepted(cluster, examples_ns, example):
    out = cluster.kubectl("apply", "-n", examples_ns, "-f", str(example)).stdout
    assert "created" in out or "configured" in out or "unchanged" in out


@pytest.mark.parametrize("example", INVALID, ids=lambda p: p.name)
def test_invalid_example_is_rejected(cluster, examples_ns, example):
    expect = expectations(example)
    assert "error" in expect, f"{example.name} lacks a '# expect-error:' first line"
    proc = cluster.kubectl("apply", "-n", examples_ns, "-f", str(example), check=False)
    assert proc.returncode != 0, f"{example.name} was accepted:\n{proc.stdout}"
    message = proc.stderr
    # kubectl prints 422s as 'The <Kind> "<name>" is invalid: ...', other rejections as 'Error from server'.
    assert "Error from server" in message or " is invalid: " in message, f"not an apiserver rejection:\n{message}"
    assert expect["error"] in message, f"{example.name}: {expect['error']!r} not in:\n{message}"
    if "path" in expect:
        assert expect["path"] in message, f"{example.name}: path {expect['path']!r} not in:\n{message}"
