"""What this machine charges a process for being woken: the floor under any per-event CPU figure.

A relay that sleeps between events pays a wake-up per event (scheduler, and in a VM the halted vCPU's
exit and the cold caches after it) before doing any work of its own. `wakeup_cost` measures it with a
bare loop: a forked child writes 200 bytes every `gap` seconds on a socketpair, the parent waits in
epoll, reads, and counts its own on-CPU time (schedstat: exact, where /proc's user/system times are
sampled per tick and bias short wake-ups)."""

from __future__ import annotations

import os
import select
import socket
import time
from pathlib import Path


def on_cpu_seconds(pid: int | str = "self") -> float:
    """A process's time on a CPU, all its threads, from the scheduler's own count (schedstat, ns)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended while we read
            continue
    return total / 1e9


def wakeup_cost(gap: float, wakeups: int = 2000) -> float:
    """µs of CPU per wake-up of a process that does nothing else, woken every `gap` seconds."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the sender
        parent.close()
        for _ in range(wakeups):
            child.send(b"x" * 200)
            time.sleep(gap)
        child.send(b"END")
        os._exit(0)
    child.close()
    poll = select.epoll()
    poll.register(parent.fileno(), select.EPOLLIN)
    woken = 0
    start = on_cpu_seconds()
    try:
        while True:
            poll.poll()
            woken += 1
            if parent.recv(4096).endswith(b"END"):
                break
        return (on_cpu_seconds() - start) / woken * 1e6
    finally:
        poll.close()
        parent.close()
        os.waitpid(pid, 0)
