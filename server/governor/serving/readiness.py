"""Readiness: a real generation probe, cached briefly so that probing never loads the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from governor.engine.pool import EnginePool

log = logging.getLogger("governor")

PROBE_REQUEST: dict[str, Any] = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}


class Readiness:
    """Ready = not draining, an engine is up, and it generated a token within `cache_seconds`.

    The probe is a completions request built like a client's under the default preset (`probe_body`),
    so an engine that refuses Governor's processor arguments (an older vLLM, a remote engine started
    without them) is not ready. `degraded` lists controls that run without the model's files.
    """

    def __init__(
        self,
        pool: EnginePool,
        cache_seconds: float,
        probe_body: Callable[[], dict[str, Any]] | None = None,
        degraded: list[str] | None = None,
    ) -> None:
        self.pool = pool
        self.cache_seconds = cache_seconds
        self.probe_body = probe_body or (lambda: dict(PROBE_REQUEST))
        self.degraded = list(degraded or ())
        self._checked_at = -1e9
        self._ok = False
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, str]:
        if self.pool.draining:
            return False, "draining"
        ready = self.pool.ready()
        if not ready:
            return False, "no engine is ready"
        if time.monotonic() - self._checked_at < self.cache_seconds:
            return self._ok, "ok" if self._ok else "generation probe failed"
        async with self._lock:  # concurrent probes share one generation
            if time.monotonic() - self._checked_at >= self.cache_seconds:
                self._ok = await ready[0].probe(self.probe_body())
                self._checked_at = time.monotonic()
                if not self._ok:
                    log.warning("readiness probe failed on engine %s", ready[0].name)
        return self._ok, "ok" if self._ok else "generation probe failed"
