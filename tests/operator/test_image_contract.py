"""The images and the pods that run them agree: user, read-only root, a volume for every writable path.

The Dockerfile declares, per target, its user (``USER``) and the paths it writes
(``LABEL io.kvfleet.writable-paths``). The operator's pod builder (engine image) and the chart's
Deployment (operator image) must run that user, with a read-only root filesystem and a volume
mounted at (or above) each writable path, or the container fails on its first write.
e2e/tests/test_images.py checks the same on the built images (``podman image inspect``).
"""

from __future__ import annotations

import re
import shlex

import pytest
from kvfleet.operator.builders import DEFAULT_IMAGE, desired_objects
from op_testlib import ROOT, chat_fleet, colocated, inputs
from test_chart import helm, render  # noqa: F401 - helm is a fixture

DOCKERFILE = ROOT / "Dockerfile"


def stages() -> dict[str, dict[str, object]]:
    """Each named Dockerfile stage's USER, writable paths label and ENV names (last value wins)."""
    out: dict[str, dict[str, object]] = {}
    current: dict[str, object] = {}
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I):
            current = out.setdefault(m.group(1), {"user": None, "writable": [], "env": {}})
        elif m := re.match(r"USER\s+(\S+)", line):
            current["user"] = m.group(1)
        elif line.startswith("LABEL"):
            for key, value in (kv.split("=", 1) for kv in shlex.split(line[5:])):
                if key == "io.kvfleet.writable-paths":
                    current["writable"] = value.split()
        elif line.startswith("ENV"):
            current["env"].update(kv.split("=", 1) for kv in line[3:].split() if "=" in kv)  # type: ignore[union-attr]
    return out


def covered(path: str, mounts: list[dict]) -> bool:
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
               for m in mounts if not m.get("readOnly"))


def check_pod(pod_spec: dict, stage: dict[str, object]) -> None:
    uid, gid = str(stage["user"]).split(":")
    psc = pod_spec.get("securityContext") or {}
    for c in pod_spec["containers"]:
        csc = c.get("securityContext") or {}
        assert str(csc.get("runAsUser", psc.get("runAsUser"))) == uid, c["name"]
        assert str(csc.get("runAsGroup", psc.get("runAsGroup"))) == gid, c["name"]
        assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
        assert csc["readOnlyRootFilesystem"] is True
        mounts = c.get("volumeMounts") or []
        missing = [p for p in stage["writable"] if not covered(p, mounts)]  # type: ignore[attr-defined]
        assert not missing, f"{c['name']}: no writable volume at {missing}"
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        for m in mounts:
            if covered(m["mountPath"], [m]) and m["mountPath"] in stage["writable"]:  # type: ignore[operator]
                assert "emptyDir" in volumes[m["name"]], m


def test_the_dockerfile_declares_a_non_root_user_and_writable_paths_per_image():
    s = stages()
    for target in ("operator", "engine"):
        assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", str(s[target]["user"])), s[target]
        assert "/tmp" in s[target]["writable"]  # type: ignore[operator]
        assert s[target]["env"]["PYTHONSAFEPATH"] == "1"  # type: ignore[index]
    # the engine materialises builtin models into KVFLEET_CACHE, which must be one of its volumes
    assert s["engine"]["env"]["KVFLEET_CACHE"] in s["engine"]["writable"]  # type: ignore[index,operator]


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_every_pod_the_operator_builds_fits_the_engine_image(topology):
    fleet = chat_fleet() if topology == "disaggregated" else colocated(chat_fleet())
    engine = stages()["engine"]
    pods = [o["spec"]["template"]["spec"] for o in desired_objects(inputs(fleet))
            if o["kind"] in ("Deployment", "StatefulSet")]
    assert pods
    for spec in pods:
        check_pod(spec, engine)
    assert DEFAULT_IMAGE.split(":")[0].endswith("/kvfleet-engine")


def test_the_charts_operator_pod_fits_the_operator_image(helm):  # noqa: F811
    docs = render(helm)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    check_pod(spec, stages()["operator"])
    (container,) = spec["containers"]
    assert container["image"].split(":")[0].endswith("/kvfleet-operator")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KVFLEET_IMAGE"].split(":")[0].endswith("/kvfleet-engine")


def test_chart_values_point_both_images_at_one_registry(helm):  # noqa: F811
    docs = render(helm, "image.repository=127.0.0.1:5000/kvfleet-operator", "image.tag=t1",
                  "engineImage.repository=127.0.0.1:5000/kvfleet-engine")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "127.0.0.1:5000/kvfleet-operator:t1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KVFLEET_IMAGE"] == "127.0.0.1:5000/kvfleet-engine:t1"
