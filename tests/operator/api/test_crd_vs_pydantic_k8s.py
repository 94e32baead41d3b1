"""The CRD's verdict (the real kube-apiserver, server-side dry run) equals pydantic's on the same objects.

The models are the one source of both; this proves it on several hundred inputs at the edges of
every shape (quantities, keys, paths, strings, numbers, names, contradictions). A disagreement is a
bug in one of the two worlds: the test lists every one, with both verdicts. Where both refuse, the
API server's message must name a field path pydantic reports (so `kubectl apply` points at the same
field), and no refusal may come from a CEL rule that failed to evaluate (e.g. a missing `has()`).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from admission_cases import cases
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from kvfleet.operator.api import GROUP, KIND_BY_NAME, VERSION
from kvfleet.operator.api.validate import InvalidResource, parse

pytestmark = pytest.mark.k8s


def as_kubectl_sends(doc: Any) -> Any:
    """The JSON kubectl sends for a YAML document: numbers without a fraction are integers (1.0 -> 1).

    NOTE: a client that posts `1.0` itself meets an API-server quirk: the schema takes 1.0 for an
    integer, but a CEL rule reading that field then fails ("expected int, got float64"), so the
    verdict depends on which rules read the field. Pydantic takes what the server stores (1).
    """
    if isinstance(doc, float) and doc.is_integer():
        return int(doc)
    if isinstance(doc, dict):
        return {k: as_kubectl_sends(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [as_kubectl_sends(v) for v in doc]
    return doc


def server_verdict(api: k8s.CustomObjectsApi, namespace: str, doc: dict[str, Any]) -> tuple[bool, str]:
    plural = KIND_BY_NAME[doc["kind"]].plural
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, as_kubectl_sends(doc),
                                            dry_run="All")
    except ApiException as exc:
        if exc.status in (400, 422):
            try:
                return False, json.loads(exc.body).get("message", "")
            except ValueError:
                return False, str(exc.body)
        raise
    return True, ""


def pydantic_verdict(doc: dict[str, Any]) -> tuple[bool, str, list[str]]:
    try:
        parse(doc)
    except InvalidResource as exc:
        return False, str(exc), [e.path for e in exc.errors]
    return True, "", []


def names_a_path(message: str, paths: list[str]) -> bool:
    """Whether the server's message names one of pydantic's paths.

    NOTE: the API server spells a map key `m.key` in schema errors and `m[key]` in CEL rule errors.
    """
    return any(p in message or re.sub(r"\[([^\]0-9][^\]]*)\]", r".\1", p) in message for p in paths if p)


def test_crd_and_pydantic_agree(cluster: Any, crds: None, namespace: str, record_property: Any) -> None:
    api = k8s.CustomObjectsApi(cluster.api)
    all_cases = cases()
    disagreements = []
    refused = 0
    t0 = time.monotonic()
    for case_id, doc in all_cases:
        server_ok, server_msg = server_verdict(api, namespace, doc)
        model_ok, model_msg, paths = pydantic_verdict(doc)
        refused += not server_ok
        if server_ok != model_ok:
            disagreements.append(f"{case_id}\n  server: {'accepted' if server_ok else server_msg}"
                                 f"\n  pydantic: {'accepted' if model_ok else model_msg}")
        elif not server_ok and not names_a_path(server_msg, paths):
            disagreements.append(f"{case_id}: the server names no path of {paths}\n  server: {server_msg}")
        elif "evaluating rule" in server_msg:
            disagreements.append(f"{case_id}: a CEL rule failed to evaluate\n  server: {server_msg}")
    elapsed = time.monotonic() - t0
    record_property("cases", len(all_cases))
    record_property("refused", refused)
    print(f"{len(all_cases)} cases ({refused} refused by both) in {elapsed:.1f}s")
    assert len(all_cases) >= 400
    assert not disagreements, f"{len(disagreements)} of {len(all_cases)} disagree:\n" + "\n".join(disagreements)
