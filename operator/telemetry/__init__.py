"""The operator's view of its fleets' telemetry: an OTLP receiver and sliding-window aggregates."""
