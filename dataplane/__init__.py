"""kvfleet.dataplane: the inference engine every fleet role runs.

Importing this package is cheap and torch-free; torch is imported by the
modules that need it (model, runner, kvcache storage).
"""
