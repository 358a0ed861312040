"""Relay workers: more than one process relaying on the gateway's port (``GOVERNOR_RELAY_WORKERS``).

The process `governor serve` starts is the owner: engines, adapters, admission, quotas, metrics and every
route, as with one process. With N relay workers it also starts N - 1 worker processes; all N listen on the
public port with SO_REUSEPORT, so the kernel spreads new connections over them. A worker relays the
generation requests it receives (the owner plans each one: ``serving/tickets.py``) and passes everything else
to the owner, over a Unix socket in a directory only this user can enter. The owner restarts a worker that
exits, after giving back what it held, and stops them all when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys

from governor.engine.base import EngineClient
from governor.engine.process import private_socket_dir
from governor.engine.remote import RemoteEngine
from governor.serving.tickets import Tickets
from governor.settings import SECRETS, Settings

log = logging.getLogger("governor.relay")

RESTART_DELAY_MIN = 0.5
RESTART_DELAY_MAX = 10.0
STABLE_RUN = 30.0  # a worker that ran this long before exiting is restarted after the shortest delay
WATCH_INTERVAL = 0.5


def restart_delay(previous: float | None, ran: float) -> float:
    """Seconds before restarting a worker that exited after running ``ran`` seconds: doubling while it
    keeps failing soon after starting (``previous``: the delay before its last start), from the shortest
    again once it has run ``STABLE_RUN``."""
    if previous is None or ran >= STABLE_RUN:
        return RESTART_DELAY_MIN
    return min(previous * 2, RESTART_DELAY_MAX)


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """The public listener, bound now (port 0 resolves here, so workers can join the same port)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]  # fmt: skip
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(address)
    sock.set_inheritable(False)
    return sock


def engine_spec(engine: EngineClient) -> dict[str, object]:
    """How a worker reaches one engine (a local engine's private socket and key, or a remote one's URL)."""
    if not isinstance(engine, RemoteEngine):
        raise TypeError(f"relay workers need HTTP engines; {engine.name} is {type(engine).__name__}")
    path = str(engine.socket_path) if engine.socket_path else None
    return {"name": engine.name, "base_url": engine.base_url, "served_model": engine.served_model,
            "api_key": engine.api_key, "socket_path": path}  # fmt: skip


def worker_settings(settings: Settings) -> dict[str, object]:
    """The settings as a worker rebuilds them: secrets as values (read from their files once, here)."""
    data = settings.model_dump(mode="json")
    for name in SECRETS:
        data[f"{name}_file"] = None
    return data


class RelayWorkers:
    """The owner's side: the private socket, the workers' token and spec, and the worker processes."""

    def __init__(self, settings: Settings, engines: list[EngineClient], public: socket.socket) -> None:
        self.count = settings.relay_workers - 1  # the owner relays too
        self.token = secrets.token_urlsafe(32)
        self.dir = private_socket_dir()
        self.socket_path = self.dir / "owner.sock"
        self.owner_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.owner_socket.bind(str(self.socket_path))
        host, port = settings.host, public.getsockname()[1]
        spec = {"settings": worker_settings(settings), "host": host, "port": port, "token": self.token,
                "owner": str(self.socket_path), "engines": [engine_spec(e) for e in engines]}  # fmt: skip
        self.spec_path = self.dir / "worker.json"
        fd = os.open(self.spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the keys
        with os.fdopen(fd, "w") as out:
            json.dump(spec, out)
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.started: dict[int, float] = {}  # loop time each worker last started
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self, tickets: Tickets) -> None:
        for worker in range(1, self.count + 1):
            await self._spawn(worker)
        self._watch = asyncio.create_task(self._supervise(tickets), name="relay-workers")

    async def _spawn(self, worker: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "governor.runtime.relay_worker", str(self.spec_path), str(worker)
        )
        self.procs[worker] = proc
        self.started[worker] = asyncio.get_running_loop().time()
        log.info("relay worker %d started (pid %d)", worker, proc.pid)

    async def _supervise(self, tickets: Tickets) -> None:
        """Every ``WATCH_INTERVAL``: release what an exited worker held at once, restart it when its delay
        is over (each worker on its own schedule: one restarting never holds up another), sweep tickets."""
        loop = asyncio.get_running_loop()
        delays: dict[int, float] = {}  # the delay before each worker's last restart
        due: dict[int, float] = {}  # exited workers: when they start again
        while not self._stopping:
            now = loop.time()
            for worker, proc in list(self.procs.items()):
                if proc.returncode is None:
                    continue
                if worker not in due:
                    tickets.drop_worker(worker)
                    delays[worker] = delay = restart_delay(delays.get(worker), now - self.started[worker])
                    due[worker] = now + delay
                    log.warning("relay worker %d exited (%s); restarting in %.1f s", worker, proc.returncode,
                                delay)  # fmt: skip
                elif now >= due[worker]:
                    del due[worker]
                    await self._spawn(worker)
            tickets.sweep()
            await asyncio.sleep(WATCH_INTERVAL)

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(OSError):
            self.owner_socket.close()
        shutil.rmtree(self.dir, ignore_errors=True)
