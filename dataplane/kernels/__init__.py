"""Compiled CPU kernels for the engine's hot path (`cpu_ops.cpp`, built once by `cpu.py`)."""
