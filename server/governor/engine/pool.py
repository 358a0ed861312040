"""EnginePool: routing across engines (least outstanding requests, adapter affinity) and admission."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator

from governor.engine.base import EngineClient, EngineState
from governor.errors import EngineUnavailable, Overloaded


class EnginePool:
    """The engines behind one gateway. Requests go to a ready engine; beyond capacity they get 429."""

    def __init__(self, engines: list[EngineClient], max_in_flight: int) -> None:
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = engines
        self.max_in_flight = max_in_flight  # per engine: running + queued inside vLLM
        self.draining = False

    @property
    def served_model(self) -> str:
        return next((e.served_model for e in self.engines if e.served_model), "")

    def ready(self) -> list[EngineClient]:
        return [e for e in self.engines if e.state == EngineState.READY]

    def any_ready(self) -> bool:
        return any(e.state == EngineState.READY for e in self.engines)

    def pick(self, prefer: Iterable[str] = (), exclude: Iterable[str] = (), sequences: int = 1) -> EngineClient:
        """Least outstanding among ready engines, preferring those named in `prefer` (adapter affinity).
        `outstanding` counts sequences (prompts x n): the engine's budget is in sequences, not requests."""
        if self.draining:
            raise EngineUnavailable("Server is draining for shutdown; retry on another replica.", code="draining")
        skip = set(exclude)
        ready = [e for e in self.ready() if e.name not in skip]
        if not ready:
            raise EngineUnavailable("No engine is ready yet; retry shortly.")
        preferred = set(prefer)
        candidates = [e for e in ready if e.name in preferred] or ready
        best = min(candidates, key=lambda e: e.outstanding)
        if best.outstanding + sequences > self.max_in_flight:
            # Affinity is a preference, not a reason to refuse: fall back to any engine with room.
            best = min(ready, key=lambda e: e.outstanding)
            if best.outstanding + sequences > self.max_in_flight:
                raise Overloaded("Server is at capacity; retry after the indicated delay.", retry_after=1.0)
        return best

    @contextlib.contextmanager
    def admit(
        self, prefer: Iterable[str] = (), exclude: Iterable[str] = (), sequences: int = 1
    ) -> Iterator[EngineClient]:
        """Hold `sequences` of the chosen engine's budget for the duration of a request (plain, not async:
        a streaming response releases it from a synchronous close)."""
        engine = self.pick(prefer, exclude, sequences)
        engine.outstanding += sequences
        try:
            yield engine
        finally:
            engine.outstanding -= sequences

    def outstanding(self) -> int:
        return sum(e.outstanding for e in self.engines)

    async def start(self) -> None:
        for engine in self.engines:
            await engine.start()

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines), return_exceptions=True)
