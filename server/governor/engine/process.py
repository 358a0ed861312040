"""VllmProcess: starts a vLLM server as a child process, watches it and restarts it when it dies.

The engine listens on a Unix socket in a directory only Governor's user can enter, and wants a key
that only Governor holds (VLLM_API_KEY in its environment: a command line is readable by everyone in
/proc) on every route, not only on the prefixes vLLM guards itself (Governor's guard, engine/guard.py).
It runs under governor.engine.watchdog, so it dies with Governor however Governor dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import psutil

from governor.engine.base import EngineState
from governor.engine.guard import GUARD_FLAGS, KEY_ENV
from governor.engine.remote import HEALTH_FAILURES_DOWN, HEALTH_INTERVAL, RemoteEngine

log = logging.getLogger("governor.engine")

PROGRESS_EVERY = 10.0
# An engine that stayed up this long earned a fresh backoff.
STABLE_SECONDS = 120.0
# The watchdog's own grace (watchdog.GRACE) is shorter: it kills what is left before we have to.
STOP_GRACE = 10.0
# sun_path is 108 bytes on Linux, with the terminating NUL.
_SOCKET_PATH_MAX = 107


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_socket_dir() -> Path:
    """A fresh directory only this user can enter (mkdtemp makes it 0700), short enough for a socket path."""
    for base in (None, "/tmp"):
        path = Path(tempfile.mkdtemp(prefix="governor-", dir=base))
        if len(str(path / "engine-00.sock").encode()) <= _SOCKET_PATH_MAX:
            return path
        path.rmdir()
    raise RuntimeError("no temporary directory short enough for a Unix socket path")


def _watchdog_gets_signal_on_our_death() -> None:
    """In the child, before exec: SIGUSR1 when Governor dies (the watchdog then checks getppid)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR1, 0, 0, 0)  # PR_SET_PDEATHSIG


def sweep_stale(record: Path) -> None:
    """Kill what a previous Governor's engine left behind, if its watchdog died too (e.g. SIGKILL to both).

    The record names the watchdog, which led the engine's process group. While the watchdog lives it
    cleans up by itself, and a live process with that pid that is not ours means the pid was reused:
    either way, nothing to do. Otherwise every process of ours still in that group is an orphan.
    """
    try:
        data = json.loads(record.read_text())
        group = int(data["watchdog"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    uid = os.getuid()
    if not psutil.pid_exists(group):
        for proc in psutil.process_iter(["uids"]):
            with contextlib.suppress(psutil.Error, OSError):
                if proc.info["uids"] and proc.info["uids"].real == uid and os.getpgid(proc.pid) == group:
                    log.warning("killing orphaned engine process %d (%s)", proc.pid, " ".join(proc.cmdline())[:80])
                    proc.kill()
        stale_dir = data.get("socket_dir")
        if stale_dir and Path(stale_dir).name.startswith("governor-"):
            shutil.rmtree(stale_dir, ignore_errors=True)
    record.unlink(missing_ok=True)


class VllmProcess(RemoteEngine):
    """A supervised local vLLM server on a private Unix socket (or a loopback port, when asked)."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        served_model: str,
        log_path: Path,
        start_timeout: float,
        backoff_max: float,
        socket_path: Path | None = None,
        port: int = 0,
        record: Path | None = None,
        start_lock: asyncio.Lock | None = None,
    ) -> None:
        """command listens on socket_path (--uds) or on the loopback port; record: where the watchdog's
        pid is kept for the next start's sweep; start_lock: held from spawn to healthy (shared GPU)."""
        api_key = secrets.token_urlsafe(32)
        super().__init__(name, f"http://127.0.0.1:{port}" if port else "http://engine", served_model,
                         api_key=api_key, socket_path=socket_path)  # fmt: skip
        self.command = [*command, *GUARD_FLAGS]  # the key, and the guard that wants it on every route
        self.env = {**env, KEY_ENV: api_key}
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.backoff_max = backoff_max
        self.record = record
        self.start_lock = start_lock
        self.restarts = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The watchdog's pid; it leads the engine's process group."""
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    async def start(self) -> None:
        if self.record:
            sweep_stale(self.record)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def stop(self) -> None:
        self.state = EngineState.STOPPED
        self._ready_event.clear()
        if self._supervisor:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await self._kill()
        await super().stop()
        if self.socket_path:
            self.socket_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.socket_path.parent.rmdir()  # the engines' private directory, once the last one stopped
        if self.record:
            self.record.unlink(missing_ok=True)

    async def _supervise(self) -> None:
        backoff = 1.0
        while self.state != EngineState.STOPPED:
            started = time.monotonic()
            async with self.start_lock or contextlib.nullcontext():
                await self._spawn()
                healthy = await self._wait_healthy()
            if healthy:
                await self._became_ready()
                await self._watch()
            if self.state == EngineState.STOPPED:
                return
            self._went_down(self._exit_reason())
            await self._kill()
            if time.monotonic() - started > STABLE_SECONDS:
                backoff = 1.0
            self.restarts += 1
            log.warning("restarting engine %s in %.0f s (restart #%d)", self.name, backoff, self.restarts)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path:
            self.socket_path.unlink(missing_ok=True)  # vLLM binds it and fails on a leftover
        log.info("starting engine %s: %s (log: %s)", self.name, " ".join(self.command[2:6]), self.log_path)
        with open(self.log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "governor.engine.watchdog", str(os.getpid()), "--", *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # the watchdog leads a process group: the last resort kills it whole
                preexec_fn=_watchdog_gets_signal_on_our_death,
            )  # fmt: skip
        if self.record:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            socket_dir = str(self.socket_path.parent) if self.socket_path else None
            self.record.write_text(json.dumps({"watchdog": self.proc.pid, "socket_dir": socket_dir}))
        self.state = EngineState.STARTING

    async def _wait_healthy(self) -> bool:
        begin = time.monotonic()
        next_note = begin + PROGRESS_EVERY
        while self.proc and self.proc.returncode is None:
            if await self.health(timeout=1.0):
                log.info("engine %s healthy after %.0f s", self.name, time.monotonic() - begin)
                return True
            now = time.monotonic()
            if now - begin > self.start_timeout:
                log.error("engine %s not healthy after %.0f s; giving up on this start", self.name, now - begin)
                return False
            if now >= next_note:
                log.info("engine %s warming up (%.0f s): %s", self.name, now - begin, self._last_log_line())
                next_note = now + PROGRESS_EVERY
            await asyncio.sleep(HEALTH_INTERVAL)
        log.error("engine %s exited during start; last log lines:\n%s", self.name, self._log_tail(20))
        return False

    async def _watch(self) -> None:
        """Return when the process exits or stops answering health checks.

        A request's connection failure only makes the next check come sooner (see `suspect`); the exit of
        the process is what marks a local engine down at once."""
        failures = 0
        assert self.proc is not None
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            while self.state != EngineState.STOPPED:
                await self._pause(until=exited)
                if exited.done():
                    return
                healthy = await self.checked_health(timeout=2.0)
                self._check_now.clear()  # failures seen while this check ran are answered by it
                failures = 0 if healthy else failures + 1
                if failures >= HEALTH_FAILURES_DOWN:
                    return
        finally:
            exited.cancel()

    def _exit_reason(self) -> str:
        if self.proc is None or self.proc.returncode is None:
            return "not answering health checks"
        return f"process exited with code {self.proc.returncode}"

    async def _kill(self) -> None:
        """SIGTERM to the watchdog (it stops vLLM and then anything vLLM left); SIGKILL to the group past the grace."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5.0)

    def _log_tail(self, lines: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                tail = deque(f.read().decode("utf-8", "replace").splitlines(), maxlen=lines)
        except OSError:
            return ""
        return "\n".join(tail)

    def _last_log_line(self) -> str:
        return self._log_tail(1)[-160:]
