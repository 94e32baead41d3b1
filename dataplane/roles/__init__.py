"""Process entry points of the fleet's pods: `python -m kvfleet.dataplane.roles.<role> --config FILE`."""
