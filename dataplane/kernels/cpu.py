"""Build (once) and load the engine's CPU kernels (`cpu_ops.cpp`).

The extension is compiled with torch's own `cpp_extension` toolchain the first time an engine
asks for it and cached outside the repo, keyed by the source, torch's version and this CPU's
instruction set (it is built with `-march=native`):
`${KVFLEET_CACHE:-~/.cache/kvfleet}/kernels/cpu_ops-<key>/`. A warm load takes well under a
second; a cold build about 30 s on 2 cores.

`load_cpu_ops()` returns the module, or raises `KernelUnavailable` with the reason (no C++
compiler, a failed build) so that a caller asking for the kernels explicitly gets an error and
`EngineConfig.cpu_kernels: auto` can say why it runs the torch path instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_ops.cpp")  # the bindings; with the other sources and the header
SOURCES = [SOURCE, SOURCE.with_name("cpu_quant_attention.cpp")]
HEADERS = [SOURCE.with_name("cpu_common.h")]
_CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math"]  # the C++ standard is the one torch builds with
_lock = threading.Lock()
_loaded: ModuleType | None = None


class KernelUnavailable(RuntimeError):
    """The CPU kernels cannot be built or loaded here (the message says why)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    """What the compiled module depends on: the source, torch, Python, the flags and this CPU."""
    h = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), torch.__version__.encode(), sys.version.encode(), " ".join(_CFLAGS).encode(),
                 _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_dir() -> Path:
    root = Path(os.environ.get("KVFLEET_CACHE") or Path.home() / ".cache" / "kvfleet")
    return root / "kernels" / f"cpu_ops-{build_key()}"


def load_cpu_ops() -> ModuleType:
    """The compiled kernels (built on first use, then cached); raises KernelUnavailable."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise KernelUnavailable(f"no C++ compiler ({compiler!r} not on PATH) to build {SOURCE.name}")
        from torch.utils import cpp_extension

        out = build_dir()
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not any(out.glob("*.so")):
                log.info("building the CPU kernels into %s (once; about 30 s)", out)
            _loaded = cpp_extension.load(name="kvfleet_cpu_ops", sources=[str(f) for f in SOURCES], extra_cflags=_CFLAGS,
                                         build_directory=str(out), verbose=False)
        except (OSError, RuntimeError, ImportError) as e:  # a compiler error arrives as RuntimeError
            raise KernelUnavailable(f"building {SOURCE.name} failed: {str(e)[-2000:]}") from e
        return _loaded


_warned = False  # `auto` says once per process why it runs the torch path


def kernels_for(mode: str) -> ModuleType | None:
    """`EngineConfig.cpu_kernels` -> the kernels: 'off' None; 'on' raises KernelUnavailable if they
    cannot be built; 'auto' logs why (once per process) and returns None."""
    if mode == "off":
        return None
    try:
        return load_cpu_ops()
    except KernelUnavailable as e:
        if mode == "on":
            raise
        global _warned
        if not _warned:
            log.warning("CPU kernels unavailable, running the torch path: %s", e)
            _warned = True
        return None


def attach_cpu_kernels(mode: str, model: torch.nn.Module, attention: object) -> ModuleType | None:
    """Hand the kernels to every module of `model` whose class declares a `kernels` slot and to the
    paged attention backend; returns them. None (off, or unavailable under auto) is handed over too,
    so a model another engine ran with kernels runs the torch path here."""
    ops = kernels_for(mode)
    for module in model.modules():
        if hasattr(type(module), "kernels"):
            module.kernels = ops
    attention.kernels = ops  # type: ignore[attr-defined]
    return ops


if __name__ == "__main__":  # `make kernels`: build once, say where
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"CPU kernels: {load_cpu_ops().__file__}")
