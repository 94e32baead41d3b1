"""router.json as the router reads it: the fleet's routing policy and where the memory pool's pods listen."""

from __future__ import annotations

import json

from kvfleet.dataplane.roles.routing import RoutingPolicy
from kvfleet.operator.builders import desired_objects
from op_testlib import chat_fleet, inputs


def _router_json(fleet) -> dict:
    (cm,) = [o for o in desired_objects(inputs(fleet)) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "chat-config"]
    return json.loads(cm["data"]["router.json"])


def test_routing_defaults_to_prefix_and_the_declared_policy_reaches_the_router():
    assert RoutingPolicy.from_dict(_router_json(chat_fleet())["routing"]) == RoutingPolicy()
    fleet = chat_fleet()
    fleet["spec"]["router"]["routing"] = {"mode": "round-robin", "loadWeight": 2.5}
    router = _router_json(fleet)
    assert RoutingPolicy.from_dict(router["routing"]) == RoutingPolicy(mode="round-robin", load_weight=2.5)
    assert router["mempool"]["port"] == 50052  # the router discovers the pool's pods and names them per call
