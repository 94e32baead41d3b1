"""Publish a directory into the version-keyed cache (`$KVFLEET_CACHE`) all at once."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish(target: Path, fill: Callable[[Path], None], marker: str) -> Path:
    """Build the entry with `fill(tmp)` in a temporary sibling of `target`, then rename it into place,
    so a reader never sees half an entry. A concurrent builder that got there first (its `marker`
    file present) counts as done: same key, same content."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
