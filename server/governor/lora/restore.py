"""Adapters after an engine (re)start: what was ready is loaded again (pinned, then most recent first), then
registered ones fill the engine's free slots; the rest stay registered until used."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from governor.engine.base import EngineClient
from governor.errors import EngineUnavailable, GovernorError
from governor.lora.adapter import Adapter, AdapterState
from governor.lora.loader import AdapterLoader

log = logging.getLogger("governor.lora")
READY = AdapterState.READY


async def restore(
    engine: EngineClient,
    adapters: dict[str, Adapter],
    lock: Callable[[str], asyncio.Lock],
    loader: AdapterLoader,
    slots: int,
) -> None:
    """After an engine (re)start: re-load what was ready, then eagerly load discovered ones into free slots."""
    order = sorted(adapters.values(), key=lambda a: (not a.pinned, -a.lru))
    for a in [x for x in order if x.state == READY]:
        async with lock(a.name):
            v = a.current
            if adapters.get(a.name) is not a or a.state != READY or v is None:
                continue
            if v.engines.get(engine.name) == engine.generation:
                continue
            try:
                await loader.load_locked(a)
            except EngineUnavailable:
                return  # down again: the next ready transition restores
            except GovernorError as exc:
                log.warning("adapter '%s' not restored: %s", a.name, exc.message)
    discovered = [a for a in adapters.values() if a.state == AdapterState.DISCOVERED]
    for a in sorted(discovered, key=lambda a: (not a.pinned, a.source != "api", a.name)):
        if sum(x.state == READY for x in adapters.values()) >= slots:
            break
        async with lock(a.name):
            if adapters.get(a.name) is not a or a.state != AdapterState.DISCOVERED:
                continue
            try:
                await loader.load_locked(a, wait=0)
            except EngineUnavailable:
                return
            except GovernorError as exc:
                log.warning("adapter '%s' not loaded at start: %s", a.name, exc.message)  # fmt: skip
