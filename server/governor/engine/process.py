"""VllmProcess: starts a vLLM server as a child process, watches it and restarts it when it dies."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import time
from collections import deque
from pathlib import Path

from governor.engine.base import EngineState
from governor.engine.remote import HEALTH_FAILURES_DOWN, HEALTH_INTERVAL, RemoteEngine

log = logging.getLogger("governor.engine")

PROGRESS_EVERY = 10.0
# An engine that stayed up this long earned a fresh backoff.
STABLE_SECONDS = 120.0
STOP_GRACE = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the gateway dies, so a crash never leaves an orphan engine."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VllmProcess(RemoteEngine):
    """A supervised local vLLM server on a loopback port."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        port: int,
        served_model: str,
        log_path: Path,
        start_timeout: float,
        backoff_max: float,
    ) -> None:
        super().__init__(name, f"http://127.0.0.1:{port}", served_model)
        self.command = command
        self.env = env
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.backoff_max = backoff_max
        self.restarts = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def stop(self) -> None:
        self.state = EngineState.STOPPED
        self._ready_event.clear()
        if self._supervisor:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await self._kill()
        await super().stop()

    async def _supervise(self) -> None:
        backoff = 1.0
        while self.state != EngineState.STOPPED:
            started = time.monotonic()
            await self._spawn()
            if await self._wait_healthy():
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
        log.info("starting engine %s: %s (log: %s)", self.name, " ".join(self.command[2:6]), self.log_path)
        with open(self.log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: we stop vLLM and its workers together
                preexec_fn=_die_with_parent,
            )
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
        """Return when the process exits or stops answering health checks."""
        failures = 0
        assert self.proc is not None
        while self.state != EngineState.STOPPED:
            try:
                await asyncio.wait_for(self.proc.wait(), HEALTH_INTERVAL)
                return
            except TimeoutError:
                pass
            healthy = await self.health(timeout=2.0)
            failures = 0 if healthy else failures + 1
            if failures >= HEALTH_FAILURES_DOWN:
                return
            if healthy and self.state == EngineState.DOWN:
                # A request saw a transient connection error; the same process answers again.
                self.state = EngineState.READY
                self._ready_event.set()

    def _exit_reason(self) -> str:
        if self.proc is None or self.proc.returncode is None:
            return "not answering health checks"
        return f"process exited with code {self.proc.returncode}"

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(proc.wait(), grace)
                # The group may outlive its leader (engine-core workers): signal it again.
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except TimeoutError:
                continue
            break

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
