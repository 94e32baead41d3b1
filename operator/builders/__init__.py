"""Pure builders: a fleet and its resolved references -> the Kubernetes objects it should own.

Nothing here performs I/O; every function is tested by value.
"""

from .inputs import DEFAULT_IMAGE, FleetInputs, OperatorSettings, desired_replicas
from .workloads import desired_objects, router_endpoint

__all__ = ["DEFAULT_IMAGE", "FleetInputs", "OperatorSettings", "desired_objects", "desired_replicas",
           "router_endpoint"]
