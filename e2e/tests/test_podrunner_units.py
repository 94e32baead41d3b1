"""Pure pieces of the pod runner: $(VAR) expansion, downward-API fields, mountPath rewriting."""

from __future__ import annotations

from pathlib import Path

from e2e.podrunner import PodRunner, expand, field_ref

POD = {"metadata": {"name": "p", "namespace": "ns", "labels": {"app": "x"}, "annotations": {"a/b": "c"}},
       "spec": {"nodeName": "gpu-node-1"}, "status": {"podIP": "127.1.0.9"}}


def test_expand_follows_kubernetes_rules():
    env = {"POD_IP": "127.1.0.9", "PORT": "80"}
    assert expand("--bind $(POD_IP):$(PORT)", env) == "--bind 127.1.0.9:80"
    assert expand("$$(POD_IP) $(MISSING)", env) == "$(POD_IP) $(MISSING)"


def test_field_ref_reads_metadata_spec_and_status():
    assert field_ref(POD, "status.podIP") == "127.1.0.9"
    assert field_ref(POD, "metadata.namespace") == "ns"
    assert field_ref(POD, "spec.nodeName") == "gpu-node-1"
    assert field_ref(POD, "metadata.labels['app']") == "x"
    assert field_ref(POD, "metadata.annotations['a/b']") == "c"
    assert field_ref(POD, "metadata.labels['nope']") == ""


def test_mount_paths_are_rewritten_on_path_boundaries_only():
    mounts = {"/etc/kvfleet": Path("/tmp/pod/volumes/config"), "/etc/kvfleet/certs": Path("/tmp/pod/volumes/certs")}
    rewrite = PodRunner._rewrite
    assert rewrite("--config=/etc/kvfleet/engine.json", mounts) == "--config=/tmp/pod/volumes/config/engine.json"
    assert rewrite("/etc/kvfleet/certs/ca.crt", mounts) == "/tmp/pod/volumes/certs/ca.crt"
    assert rewrite("/etc/kvfleet", mounts) == "/tmp/pod/volumes/config"
    assert rewrite("/etc/kvfleet-other/x", mounts) == "/etc/kvfleet-other/x"


def test_a_local_directory_containing_a_mount_path_is_not_rewritten_again():
    # /tmp is itself a mountPath (an emptyDir) and every local volume lives under /tmp.
    mounts = {"/tmp": Path("/tmp/pod/volumes/tmp"), "/etc/kvfleet/engine.json": Path("/tmp/pod/volumes/config/e.json")}
    rewrite = PodRunner._rewrite
    assert rewrite("--config /etc/kvfleet/engine.json", mounts) == "--config /tmp/pod/volumes/config/e.json"
    assert rewrite("/tmp/scratch", mounts) == "/tmp/pod/volumes/tmp/scratch"
    assert rewrite("a/tmp/b", mounts) == "a/tmp/b"  # not a path start
