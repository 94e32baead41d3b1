"""The Helm chart without a cluster: lint, render, strict values, least-privilege RBAC, chart CRDs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from op_testlib import ROOT

CHART = ROOT / "charts" / "kvfleet"


@pytest.fixture(scope="module")
def helm() -> str:
    """The helm binary `make binaries` caches (never built from here: this is a fast, pure test)."""
    candidates = []
    if os.environ.get("KVFLEET_BIN_DIR"):
        candidates.append(Path(os.environ["KVFLEET_BIN_DIR"]) / "helm")
    cache = Path(os.environ.get("KVFLEET_CACHE", Path.home() / ".cache" / "kvfleet"))
    candidates += sorted(cache.glob("bin/*/helm"), reverse=True)
    found = next((str(c) for c in candidates if c.is_file()), None) or shutil.which("helm")
    if found is None:
        pytest.skip("no helm binary: run `make binaries` (the k8s chart test then covers it too)")
    return found


def render(helm: str, *sets: str) -> list[dict]:
    args = [helm, "template", "kvfleet", str(CHART), "-n", "kvfleet-system", "--include-crds"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_lint_is_clean(helm):
    result = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_values_fail(helm):
    for bad in ("bogus=1", "operator.replica=1", "image.tags=x", "peering.enabled=maybe"):
        result = subprocess.run([helm, "template", "x", str(CHART), "--set", bad], capture_output=True, text=True)
        assert result.returncode != 0, bad


def test_every_value_is_documented():
    """Each leaf value, or an ancestor of it, has a `# --` comment block right above (helm-docs style)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        block = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j].strip())
            j -= 1
        documented = any(b.startswith("# --") for b in block) or any(d for _, d in stack)
        key, _, value = stripped.partition(":")
        leaf = bool(value.strip())
        assert documented or not leaf, f"values.yaml line {i + 1}: {key} has no '# --' doc"
        stack.append((indent, documented))


def test_rbac_is_least_privilege(helm):
    docs = render(helm)
    rules = [r for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    granted = {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    assert not {x for x in granted if x[1] in ("secrets", "nodes", "clusterroles", "clusterrolebindings")}
    # pods: read only, held so the operator may grant exactly that to each fleet's router (RBAC forbids
    # granting what one lacks); roles/rolebindings: the router's namespaced Role and its binding
    assert {x for x in granted if x[1] == "pods"} == {("", "pods", v) for v in ("get", "list", "watch")}
    assert ("rbac.authorization.k8s.io", "roles", "create") in granted
    assert ("apps", "deployments", "patch") in granted and ("", "events", "create") in granted
    assert ("kvfleet.io", "inferencefleets", "delete") not in granted
    assert ("", "namespaces", "list") not in granted  # only when watching named namespaces


def test_namespaced_mode_renders_roles_and_args(helm):
    docs = render(helm, "operator.watchNamespaces={a,b}")
    roles = sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "Role")
    assert roles == ["a", "b"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"] == ["kvfleet-discovery"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=a" in args and "--namespace=b" in args and "--standalone" in args


def test_operator_deployment_is_hardened_and_points_pods_at_the_receiver(helm):
    docs = render(helm)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KVFLEET_OTLP_ENDPOINT"] == "http://kvfleet-otlp.kvfleet-system.svc:4317"
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["ports"][0]["port"] == 4317
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert crds == {"inferencefleets.kvfleet.io", "modelvariants.kvfleet.io", "cachepolicies.kvfleet.io",
                    "sloclasses.kvfleet.io"}


def test_host_path_prefixes_reach_the_operator(helm):
    """Off by default; each allowed prefix becomes one --allow-host-path-prefix flag; bad paths fail."""
    def args(*sets: str) -> list[str]:
        dep = next(d for d in render(helm, *sets) if d["kind"] == "Deployment")
        return [a for a in dep["spec"]["template"]["spec"]["containers"][0]["args"] if "host-path" in a]

    assert args() == []
    assert args("operator.allowedHostPathPrefixes={/models,/data/llm}") == [
        "--allow-host-path-prefix=/models", "--allow-host-path-prefix=/data/llm"]
    bad = subprocess.run([helm, "template", "x", str(CHART), "--set", "operator.allowedHostPathPrefixes={/}"],
                         capture_output=True, text=True)
    assert bad.returncode != 0


def test_host_path_admission_policy_renders_the_allow_list(helm):
    def policy(*sets: str) -> list[dict]:
        return [d for d in render(helm, *sets) if d["kind"].startswith("ValidatingAdmissionPolicy")]

    (vap, binding) = policy()
    allowed = next(v for v in vap["spec"]["variables"] if v["name"] == "allowed")
    assert allowed["expression"] == "[]" and binding["spec"]["validationActions"] == ["Deny"]
    (vap, _) = policy("operator.allowedHostPathPrefixes={/models,/data/llm}")
    allowed = next(v for v in vap["spec"]["variables"] if v["name"] == "allowed")
    assert allowed["expression"] == '["/models", "/data/llm"]'
    assert policy("operator.hostPathAdmissionPolicy=false") == []
