"""The chart's ValidatingAdmissionPolicy refuses, at `kubectl apply`, a hostPath the operator would not mount.

The operator's allow-list (operator.allowedHostPathPrefixes, empty by default) is rendered into the
policy; a ModelVariant whose base or fine-tune hostPath lies outside it is refused by the real API
server, one inside is admitted. (The operator refuses the same paths itself: test_admission.py.)
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml
from op_testlib import ROOT

pytestmark = pytest.mark.k8s

CHART = ROOT / "charts" / "kvfleet"


def policy_docs(cluster: Any, release: str, *sets: str) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--show-only", "templates/hostpath-policy.yaml"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(cluster.helm(*args).stdout) if d]


def variant(name: str, host_path: str | None = None, fine_tune_path: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"family": "f", "base": {"hostPath": host_path} if host_path else {"builtin": "tiny-llama"}}
    if fine_tune_path:
        spec["fineTune"] = {"type": "full", "weights": {"hostPath": fine_tune_path}}
    return {"apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("prefixes", [(), ("/models", "/data/llm")], ids=["default", "allowed"])
def test_host_paths_outside_the_allow_list_are_refused_at_admission(cluster: Any, crds: None, namespace: str,
                                                                    prefixes: tuple[str, ...]) -> None:
    release = f"hp-{namespace}-{len(prefixes)}"
    sets = [f"operator.allowedHostPathPrefixes={{{','.join(prefixes)}}}"] if prefixes else []
    docs = policy_docs(cluster, release, *sets)
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    # the chart binds cluster-wide; here each case binds to its own namespace, so a policy of an earlier case
    # that the API server has not dropped yet cannot judge this one
    docs[1]["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": namespace}}}
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
    try:
        def create(doc: dict[str, Any]) -> Any:
            return cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                                   input=json.dumps(doc), check=False)

        outside = variant("outside", "/srv/weights")
        deadline = time.monotonic() + 30  # a new policy takes effect after the API server syncs it
        while (proc := create(outside)).returncode == 0:
            assert time.monotonic() < deadline, "the policy never took effect"
            time.sleep(0.5)
        assert "/srv/weights is not at or below a node directory this cluster allows" in proc.stderr, proc.stderr
        assert create(variant("builtin")).returncode == 0, "no hostPath: nothing to refuse"
        refused_ft = create(variant("ft", None, "/models-x/ft"))
        assert refused_ft.returncode != 0 and "/models-x/ft" in refused_ft.stderr, refused_ft.stderr
        inside = create(variant("inside", "/models/llama", "/data/llm/lora"))
        if prefixes:
            assert inside.returncode == 0, inside.stderr
        else:
            assert inside.returncode != 0 and "none: use a PVC" in inside.stderr, inside.stderr
    finally:
        for d in docs:
            cluster.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--wait=false", check=False)
