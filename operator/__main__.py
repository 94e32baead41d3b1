"""`python -m kvfleet.operator` / `kvfleet operator`: run the kopf operator.

    kvfleet operator                          # cluster-wide, standalone, liveness on :8080/healthz
    kvfleet operator -n team-a -n team-b      # only these namespaces
    kvfleet operator --peering kvfleet        # HA: several replicas, one active (kopf peering)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import time
from typing import Any

from .builders import DEFAULT_IMAGE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (flags fall back to KVFLEET_* environment variables, as the chart sets them)."""
    p = argparse.ArgumentParser(prog="kvfleet operator", description="Run the kvfleet operator (kopf).")
    p.add_argument("-n", "--namespace", action="append", default=[],
                   help="watch this namespace (repeatable); default: all namespaces")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces (the default)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--standalone", action="store_true", default=True,
                      help="no peering: assume this is the only operator (default)")
    mode.add_argument("--peering", metavar="NAME",
                      help="coordinate with other replicas through this kopf peering object")
    p.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    p.add_argument("--liveness", default=os.environ.get("KVFLEET_LIVENESS", "http://0.0.0.0:8080/healthz"),
                   help="liveness endpoint URL ('' to disable)")
    p.add_argument("--image", default=os.environ.get("KVFLEET_IMAGE", DEFAULT_IMAGE),
                   help="image of the dataplane roles (a fleet's spec.image overrides it)")
    p.add_argument("--image-pull-policy", default=os.environ.get("KVFLEET_IMAGE_PULL_POLICY", "IfNotPresent"))
    p.add_argument("--otlp-endpoint", default=os.environ.get("KVFLEET_OTLP_ENDPOINT", ""),
                   help="the operator's OTLP receiver Service URL that pods export traces to")
    p.add_argument("--otlp-listen", default=os.environ.get("KVFLEET_OTLP_LISTEN", "127.0.0.1:0"),
                   help="HOST:PORT of the OTLP/gRPC receiver (port 0: any free port; '' disables it). Without "
                        "--otlp-endpoint, pods are pointed at it on 127.0.0.1 (local runs)")
    p.add_argument("--allow-host-path-prefix", action="append", dest="host_path_prefixes",
                   default=[x for x in os.environ.get("KVFLEET_ALLOWED_HOST_PATH_PREFIXES", "").split(":") if x],
                   metavar="DIR", help="mount a ModelVariant's hostPath only at or below DIR (repeatable; "
                   "env: colon-separated). Default: no hostPath is mounted")
    p.add_argument("--workers", type=int, default=int(os.environ.get("KVFLEET_WORKERS", "8")),
                   help="concurrent reconciles")
    p.add_argument("--resync-seconds", type=float, default=float(os.environ.get("KVFLEET_RESYNC_SECONDS", "60")),
                   help="re-reconcile every fleet this often (drift correction)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run kopf until SIGTERM/SIGINT."""
    args = parse_args(argv)
    if args.peering and args.namespace and not args.all_namespaces:
        print("kvfleet operator: --peering needs --all-namespaces (it coordinates through a ClusterKopfPeering)",
              file=sys.stderr)
        return 2
    import kopf

    from . import main as handlers  # noqa: F401 - registers the handlers

    kwargs: dict[str, Any] = {
        "memo": kopf.Memo(options=args),
        "liveness_endpoint": args.liveness or None,
    }
    if args.namespace and not args.all_namespaces:
        kwargs["namespaces"] = args.namespace
    else:
        kwargs["clusterwide"] = True
    if args.peering:
        # Our own identity, so the Controller's peering gate can find this replica in the peering object.
        args.identity = f"kvfleet@{socket.gethostname()}/{os.getpid()}/{int(time.time())}"
        kwargs.update(standalone=False, peering_name=args.peering, priority=args.priority, identity=args.identity)
    else:
        kwargs["standalone"] = True
    kopf.configure(verbose=args.verbose)  # kopf's own log format for every logger
    if not args.verbose:
        # "Handler 'child-deployments' succeeded" for every watch event is noise at INFO.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(kopf.operator(**kwargs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
