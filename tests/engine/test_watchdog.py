"""Nothing an engine starts outlives Governor: the real VllmProcess and watchdog around a fake engine
tree (API server -> "EngineCore" -> a "worker" in a session of its own), without vLLM.

The real-engine version of these checks is tests/integration/test_engine_restart.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from governor.engine.process import sweep_stale
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree(pids_file: Path) -> dict[str, int]:
    text = pids_file.read_text() if pids_file.exists() else ""
    return {role: int(pid) for role, pid in (line.split() for line in text.splitlines())}


@contextmanager
def fake_governor(tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    """The fake Governor (in a process group of its own) with its whole fake engine tree up; every
    process of it gone after."""
    pids_file = tmp_path / "pids"
    gov = subprocess.Popen([sys.executable, "-m", "tests.engine.fake_governor", str(pids_file),
                            str(tmp_path / "engine-0.json")], cwd=ROOT, env={**os.environ, **env},
                           start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: {"api", "core", "worker"} <= tree(pids_file).keys(), 30, what="the fake engine tree")
        pids = tree(pids_file)
        pids["watchdog"] = psutil.Process(pids["api"]).ppid()
        yield gov, pids
    finally:
        gov.kill()
        gov.wait(10)
        for pid in tree(pids_file).values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _watchdog_is_between(gov: subprocess.Popen[bytes], pids: dict[str, int]) -> None:
    watchdog = psutil.Process(pids["watchdog"])
    assert watchdog.ppid() == gov.pid and "governor.engine.watchdog" in watchdog.cmdline()
    assert os.getpgid(pids["worker"]) != os.getpgid(pids["api"])  # the worker left the group: killpg alone misses it


def test_sigkill_of_governor_kills_the_whole_engine_tree(tmp_path: Path) -> None:
    with fake_governor(tmp_path) as (gov, pids):
        _watchdog_is_between(gov, pids)
        gov.kill()
        wait_for(lambda: not any(alive(p) for p in pids.values()), 10, interval=0.1,
                 what=f"every engine process to exit after SIGKILL of Governor: {pids}")  # fmt: skip


def test_sigterm_then_sigkill_to_governors_group_mid_shutdown(tmp_path: Path) -> None:
    """The issue's container-runtime case: SIGTERM to Governor's process group, SIGKILL to it a moment
    later, while Governor is still stopping an engine that is slow to stop. The watchdog does not sit
    out its grace period: Governor is gone, so the engine goes now."""
    with fake_governor(tmp_path, FAKE_STUBBORN="1") as (gov, pids):
        os.killpg(gov.pid, signal.SIGTERM)
        wait_for(lambda: "sigterm" in tree(tmp_path / "pids"), 10, what="the stop to reach the API server")
        os.killpg(gov.pid, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in pids.values()), 3, interval=0.1,
                 what=f"every engine process to exit well within the watchdog's grace: {pids}")  # fmt: skip


def test_engine_crash_leaves_no_stragglers(tmp_path: Path) -> None:
    """The API server dies (OOM, a bug): its children go with it, so the restart finds memory and port free."""
    with fake_governor(tmp_path) as (_, pids):
        os.kill(pids["api"], signal.SIGKILL)
        wait_for(lambda: not any(alive(pids[r]) for r in ("api", "core", "worker", "watchdog")), 10,
                 interval=0.1, what="the crashed engine's children to be killed")  # fmt: skip


def test_graceful_stop_stops_everything(tmp_path: Path) -> None:
    with fake_governor(tmp_path) as (gov, pids):
        gov.send_signal(signal.SIGINT)  # Governor's own shutdown path: VllmProcess.stop()
        assert gov.wait(30) is not None
        assert not any(alive(p) for p in pids.values()), pids
        assert not (tmp_path / "engine-0.json").exists()  # a clean stop leaves nothing to sweep


def test_sweep_kills_orphans_of_a_dead_watchdog(tmp_path: Path) -> None:
    """Both Governor and the watchdog were killed: the next start kills what is left in the group."""
    group = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    wait_for(lambda: len(psutil.Process(group.pid).children()) == 2, 10, what="the orphans-to-be")
    orphans = [c.pid for c in psutil.Process(group.pid).children()]
    group.kill()
    group.wait(10)
    record = tmp_path / "engine-0.json"
    socket_dir = tmp_path / "governor-stale"
    socket_dir.mkdir()
    record.write_text(json.dumps({"watchdog": group.pid, "socket_dir": str(socket_dir)}))
    try:
        sweep_stale(record)
        wait_for(lambda: not any(alive(p) for p in orphans), 10, interval=0.1, what="the orphans to be killed")
        assert not record.exists() and not socket_dir.exists()
    finally:
        for pid in orphans:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sweep_leaves_a_live_watchdog_alone(tmp_path: Path) -> None:
    """Another Governor's live engine (or a reused pid) is not ours to kill."""
    group = subprocess.Popen(["sleep", "300"], start_new_session=True)
    record = tmp_path / "engine-0.json"
    record.write_text(json.dumps({"watchdog": group.pid, "socket_dir": None}))
    try:
        sweep_stale(record)
        assert alive(group.pid)
    finally:
        group.kill()
        group.wait(10)


@pytest.mark.parametrize("argv", [["watchdog"], ["watchdog", "1", "x", "true"]])
def test_watchdog_refuses_a_bad_command_line(argv: list[str]) -> None:
    from governor.engine.watchdog import main

    assert main(argv) == 2
