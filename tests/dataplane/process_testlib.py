"""Run a serving process as a user would (subprocess, real port) and stop it with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def serving_process(argv: list[str], start_timeout: float = 300, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start `argv` (which must print `listening on URL`); yield URL; SIGTERM it and require a clean exit."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + start_timeout
        url = None
        assert proc.stdout is not None
        while url is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"{argv} exited early:\n" + "".join(lines)
            assert time.monotonic() < deadline, f"{argv} did not start:\n" + "".join(lines)
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        yield url
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, "".join(lines) + out
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
