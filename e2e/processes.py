"""A local serving process whose log announces its address: start, wait until ready, SIGTERM or kill.

Shared by the role tests (`tests/dataplane/roles/roles_testlib.py`) and the benchmarks (`bench/`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LoggedProcess:
    """`argv` with its output in `log`; `pattern`'s first group (found in the log) is its address."""

    name: str
    argv: list[str]
    log: Path
    pattern: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""

    def start(self) -> LoggedProcess:
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        return self

    def wait_ready(self, timeout: float = 180.0) -> LoggedProcess:
        """Until the log shows the address; AssertionError (with the log) if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_text(errors="replace")
            m = re.search(self.pattern, text)
            if m:
                self.address = m.group(1)
                return self
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{text[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name} did not start:\n{text[-3000:]}"
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed after 30 s)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)
