"""Runs the gateway under uvicorn, with a draining shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

from governor.engine.base import EngineClient
from governor.engine.pool import EnginePool
from governor.lora.merge import read_provenance
from governor.runtime.app import create_app
from governor.runtime.bootstrap import build_policy, build_pool, build_registry
from governor.runtime.limits import check_open_files
from governor.runtime.relay_workers import RelayWorkers, listening_socket
from governor.settings import Settings

log = logging.getLogger("governor")


class DrainingServer(uvicorn.Server):
    """First SIGTERM: /ready turns 503 and new requests get 503 while the listener stays open
    for `drain_seconds`; running requests finish; then uvicorn shuts down. A second signal forces it."""

    def __init__(self, config: uvicorn.Config, pool: EnginePool, drain_seconds: float, max_wait: float) -> None:
        super().__init__(config)
        self.pool = pool
        self.drain_seconds = drain_seconds
        self.max_wait = max_wait
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # SIGINT is an operator at a terminal: stop now. SIGTERM is an orchestrator: drain first.
        if self.pool.draining or self.drain_seconds <= 0 or sig == signal.SIGINT:
            super().handle_exit(sig, frame)
            return
        log.info("%s received: draining (%.0f s, then waiting for running requests)", signal.Signals(sig).name,
                 self.drain_seconds)  # fmt: skip
        self.pool.draining = True
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await asyncio.sleep(self.drain_seconds)
        deadline = time.monotonic() + self.max_wait
        while self.pool.outstanding() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        log.info("drained; shutting down")
        self.should_exit = True


def run(settings: Settings) -> None:
    check_open_files(settings)  # before any engine starts: they inherit the raised limit
    pool, model_dir = build_pool(settings)
    policy = build_policy(settings, model_dir)
    registry = build_registry(settings, pool, model_dir, policy)
    sockets: list[socket.socket] | None = None
    relay = None
    if settings.relay_workers > 1:
        public = listening_socket(settings.host, settings.port, reuse_port=True)
        relay = RelayWorkers(settings, pool.engines, public)
        sockets = [public, relay.owner_socket]
        log.info("relaying on %d processes (the gateway and %d relay workers)", settings.relay_workers, relay.count)
    app = create_app(settings, pool, policy, registry=registry, provenance=read_provenance(model_dir), relay=relay)
    url = f"http://{settings.host}:{settings.port}/v1"
    announced: set[str] = set()

    async def announce(engine: EngineClient) -> None:
        if not announced:
            log.info("Governor ready: %s (model '%s')", url, engine.served_model)
        announced.add(engine.name)

    for engine in pool.engines:
        engine.on_ready(announce)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False, timeout_graceful_shutdown=int(settings.request_timeout),
        timeout_keep_alive=settings.keep_alive_seconds,
    )  # fmt: skip
    server = DrainingServer(config, pool, settings.drain_seconds, settings.request_timeout)
    log.info("Governor listening on %s; the engine is warming up (first start compiles, ~1-3 min)", url)
    server.run(sockets=sockets)
