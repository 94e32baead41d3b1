"""kvfleet: a Kubernetes control plane (kvfleet.operator) and inference engine (kvfleet.dataplane)."""

__version__ = "0.1.0"
