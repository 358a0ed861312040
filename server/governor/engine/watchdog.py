"""The engine's watchdog: a tiny process between Governor and vLLM, so nothing vLLM starts outlives Governor.

    python -m governor.engine.watchdog GOVERNOR_PID -- COMMAND...

Why a separate process: PR_SET_PDEATHSIG on the vLLM API server kills only that process when Governor
dies; its EngineCore and workers (vLLM's own children) are then reparented to init and keep running,
holding memory, the GPU and the port. The watchdog is a child subreaper, so every process vLLM starts
stays its descendant even when an intermediate parent dies, and it kills all of them:
- when Governor is gone (PR_SET_PDEATHSIG wakes it, getppid() decides: a signal alone can come from a
  parent *thread* exiting);
- when the API server exits (stragglers of a crashed engine never block the restart);
- on SIGTERM/SIGINT: forwarded to the API server, whose own shutdown stops its children; whatever is
  left after GRACE seconds is killed.
Only the standard library: it starts in milliseconds and costs a few MB.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL = 0.2
GRACE = 8.0


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _die_with_watchdog() -> None:
    """In the API server: if the watchdog itself is killed, the API server goes too."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def descendants(root: int) -> list[int]:
    """Every live process below root, read from /proc (no psutil: keep this process small)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _reap() -> dict[int, int]:
    """Collect exited children (ours and orphans handed to us as subreaper): pid -> wait status."""
    done: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = status


def kill_all() -> None:
    """SIGKILL every descendant until none is left (a process may fork while we look)."""
    for _ in range(50):
        pids = descendants(os.getpid())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
        _reap()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: python -m governor.engine.watchdog GOVERNOR_PID -- COMMAND...\n")
        return 2
    governor = int(argv[1])
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    stop_at: list[float] = []
    reaped: dict[int, int] = {}

    def wake(_sig: int, _frame: object) -> None:
        pass  # PR_SET_PDEATHSIG: the loop below checks getppid() at once

    def stop(_sig: int, _frame: object) -> None:
        if not stop_at:
            stop_at.append(time.monotonic() + GRACE)
            if engine.pid not in reaped:  # once reaped, its pid may belong to someone else
                with contextlib.suppress(ProcessLookupError):
                    os.kill(engine.pid, signal.SIGTERM)

    signal.signal(signal.SIGUSR1, wake)
    _prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
    if os.getppid() != governor:  # Governor died before the line above took effect
        return 1
    engine = subprocess.Popen(argv[3:], preexec_fn=_die_with_watchdog)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        reaped.update(_reap())
        status = reaped.get(engine.pid)
        if status is not None:
            kill_all()
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code  # killed by signal N: 128+N, as a shell reports it
        if os.getppid() != governor or (stop_at and time.monotonic() > stop_at[0]):
            kill_all()
            return 1
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
