"""Models a kvfleet image can materialise itself (`ModelVariant.spec.base.builtin`).

    builtin_model_dir("smollm2-135m-instruct")  # the real SmolLM2-135M-Instruct, imported from GGUF
    builtin_model_dir("tiny-llama")             # a deterministic random tiny Llama, for tests

Both land in the version-keyed cache (`$KVFLEET_CACHE` or `~/.cache/kvfleet`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

BUILTINS = ("smollm2-135m-instruct", "tiny-llama")


def builtin_model_dir(name: str) -> Path:
    """The HF-format directory of builtin model `name`, creating it on first use."""
    from .smollm2 import cache_root, smollm2_dir

    if name == "smollm2-135m-instruct":
        return smollm2_dir()
    if name == "tiny-llama":
        from .tiny import write_tiny_llama

        target = cache_root() / "models" / "tiny-llama-seed0"
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama.", dir=target.parent))
            write_tiny_llama(tmp, seed=0)
            try:
                tmp.rename(target)
            except OSError:  # a concurrent writer won; same seed, same bytes
                shutil.rmtree(tmp, ignore_errors=True)
        return target
    raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTINS)}")
