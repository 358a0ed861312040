"""Benchmark child processes never outlive the benchmark, even one killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from tests.conftest import wait_for

BENCH = textwrap.dedent("""
    import sys, time
    from governor.bench.processes import spawned
    with spawned([sys.executable, "-c", "import time; time.sleep(120)"]) as watchdog:
        print(watchdog.pid, flush=True)
        time.sleep(120)
""")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_bench_takes_its_children_with_it(how: signal.Signals) -> None:
    bench = subprocess.Popen([sys.executable, "-c", BENCH], stdout=subprocess.PIPE)
    try:
        watchdog = int(bench.stdout.readline())  # type: ignore[union-attr]
        wait_for(lambda: psutil.Process(watchdog).children(), 10, interval=0.05, what="the child to start")
        (child,) = psutil.Process(watchdog).children()
        os.kill(bench.pid, how)  # SIGTERM ends Python at once: no `finally` runs in the bench
        bench.wait(10)
        wait_for(lambda: gone(child.pid) and gone(watchdog), 5, interval=0.05, what="the bench's child to stop")
    finally:
        bench.kill()
        bench.wait(10)
