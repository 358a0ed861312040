"""Readiness: a real generation probe, cached briefly so that probing never loads the engine."""

from __future__ import annotations

import asyncio
import time

from governor.engine.pool import EnginePool


class Readiness:
    """Ready = not draining, an engine is up, and it generated a token within `cache_seconds`."""

    def __init__(self, pool: EnginePool, cache_seconds: float) -> None:
        self.pool = pool
        self.cache_seconds = cache_seconds
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
                self._ok = await ready[0].probe()
                self._checked_at = time.monotonic()
        return self._ok, "ok" if self._ok else "generation probe failed"
