"""Child processes for benchmarks: started in their own group under the engine's watchdog, always stopped.

A `finally` stops them when the bench ends or raises; the watchdog stops them when the bench process is
killed outright (a `timeout`'s SIGTERM ends Python without running `finally`, which left two engines
running once), since it kills everything below it when its parent is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def spawned(
    cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run cmd for the duration of the block (and no longer than this process); output goes to `log`
    (or nowhere). The process yielded is cmd's watchdog."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115  (closed below)
    guarded = [sys.executable, "-m", "governor.engine.watchdog", str(os.getpid()), "--", *cmd]
    proc = subprocess.Popen(guarded, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if log:
            out.close()  # type: ignore[union-attr]
