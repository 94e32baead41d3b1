"""Image mode's mapping of a pod onto `podman run` (pure: no podman needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.imagemode import bind_pod_ip, loopback_registry, run_argv


def pod(**container_sc: object) -> dict:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
        "status": {"podIP": "127.3.0.9"},
        "spec": {
            "terminationGracePeriodSeconds": 7,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
            "containers": [{
                "name": "c", "image": "127.0.0.1:5000/kvfleet-operator:t",
                "command": ["kvfleet", "operator"], "args": ["--liveness=http://0.0.0.0:8080/healthz"],
                "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}, **container_sc},
            }],
        },
    }


def argv(p: dict, tmp_path: Path) -> list[str]:
    c = p["spec"]["containers"][0]
    return run_argv(p, c, name="n", env={"OTLP": "0.0.0.0:4317", "A": "b"}, argv=(c["command"], c["args"]),
                    mounts=[(tmp_path / "tmp", "/tmp", False), (tmp_path / "cfg", "/etc/kvfleet", True)],
                    env_file=tmp_path / "env", server=("127.0.0.1", 6443), label="L")


def test_security_context_volumes_and_entrypoint_map_onto_podman_run(tmp_path):
    cmd = argv(pod(), tmp_path)
    joined = " ".join(cmd)
    for flag in ("--network=host", "--user 10001:10001", "--group-add 10001", "--read-only",
                 "--read-only-tmpfs=false", "--cap-drop=all", "--security-opt=no-new-privileges",
                 "--stop-timeout 7", "--pull=never", f"-v {tmp_path / 'tmp'}:/tmp ",
                 f"-v {tmp_path / 'cfg'}:/etc/kvfleet:ro", '--entrypoint ["kvfleet", "operator"]'):
        assert flag in joined, flag
    assert cmd[-2:] == ["127.0.0.1:5000/kvfleet-operator:t", "--liveness=http://127.3.0.9:8080/healthz"]
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert env == {"OTLP": "127.3.0.9:4317", "A": "b", "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                   "KUBERNETES_SERVICE_PORT": "6443", "POD_IP": "127.3.0.9"}
    assert (tmp_path / "env").stat().st_mode & 0o077 == 0  # values may be Secrets


def test_run_as_non_root_refuses_uid_0_like_a_kubelet(tmp_path):
    with pytest.raises(PermissionError, match="runAsNonRoot"):
        argv(pod(runAsUser=0), tmp_path)


def test_a_writable_root_is_not_made_read_only(tmp_path):
    assert "--read-only" not in argv(pod(readOnlyRootFilesystem=False), tmp_path)


def test_only_the_unspecified_address_is_rebound_and_only_loopback_registries_are_pulled():
    assert bind_pod_ip("0.0.0.0:80 10.0.0.0 100.0.0.01", "127.1.0.2") == "127.1.0.2:80 10.0.0.0 100.0.0.01"
    assert loopback_registry("127.0.0.1:5000/a:b") and loopback_registry("localhost:5001/x")
    assert not loopback_registry("ghcr.io/kvfleet/kvfleet-engine:1") and not loopback_registry("kvfleet:dev")
