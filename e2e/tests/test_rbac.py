"""RBAC is really enforced: ServiceAccount tokens authenticate, Roles authorize."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.k8s


def get_with_token(cluster, path: str, token: str) -> int:
    cfg = cluster.api.configuration
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    req = urllib.request.Request(cfg.host + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_service_account_needs_a_role(cluster, namespace):
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    who = f"system:serviceaccount:{namespace}:reader"
    can_i = cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace, f"--as={who}", check=False)
    assert can_i.stdout.strip() == "no" and can_i.returncode != 0

    token = cluster.kubectl("create", "token", "reader", "-n", namespace).stdout.strip()
    path = f"/api/v1/namespaces/{namespace}/pods"
    assert get_with_token(cluster, path, token) == 403
    assert get_with_token(cluster, path, "not-a-token") == 401

    cluster.kubectl("create", "role", "pod-reader", "--verb=get,list,watch", "--resource=pods", "-n", namespace)
    cluster.kubectl("create", "rolebinding", "reader-reads", "--role=pod-reader",
                    f"--serviceaccount={namespace}:reader", "-n", namespace)
    assert cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace, f"--as={who}").stdout.strip() == "yes"
    deadline = time.monotonic() + 10
    while (status := get_with_token(cluster, path, token)) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200
    assert get_with_token(cluster, "/api/v1/namespaces/kube-system/pods", token) == 403


def test_controllers_publish_root_ca_and_default_service_account(cluster, namespace):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sas = [s.metadata.name for s in cluster.core.list_namespaced_service_account(namespace).items]
        cms = [c.metadata.name for c in cluster.core.list_namespaced_config_map(namespace).items]
        if "default" in sas and "kube-root-ca.crt" in cms:
            return
        time.sleep(0.2)
    raise AssertionError(f"namespace {namespace} got no default SA / kube-root-ca.crt")
