"""AdapterRegistry: registered adapters, routing to them, pins, persistence, watcher events and restore
after an engine restart. One asyncio.Lock per name serialises everything done to an adapter, so 20
concurrent first requests load it once. The engine side of the state machine lives in loader.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from governor.engine.base import EngineClient, EngineState
from governor.engine.pool import EnginePool
from governor.errors import (
    AdapterWaitTimeout,
    Conflict,
    EngineUnavailable,
    GovernorError,
    InvalidRequest,
    Overloaded,
)
from governor.lora.adapter import Adapter, AdapterState, Source, Version
from governor.lora.base_model import BaseModelInfo
from governor.lora.catalog import READY, AdapterCatalog
from governor.lora.loader import AdapterLoader
from governor.lora.metrics import AdapterMetrics
from governor.lora.objects import ObjectFetcher, is_object_url
from governor.lora.restore import restore
from governor.lora.staging import make_stager
from governor.lora.store import RegistryStore
from governor.lora.validate import AdapterValidator, check_name, is_temporary
from governor.lora.watcher import AdapterWatcher
from governor.settings import Settings
from governor.target import Target

log = logging.getLogger("governor.lora")
Names = list[str]


class AdapterRegistry(AdapterCatalog):
    """Every registered adapter and its state; the service's AdapterResolver and the admin API's backend."""

    def __init__(
        self,
        settings: Settings,
        pool: EnginePool,
        base: BaseModelInfo,
        metrics_registry: CollectorRegistry | None = None,
        compile_profile: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        """``compile_profile``: the policy's, so a bad governor.json fails its adapter when it loads."""
        self.settings = settings
        self.pool = pool
        self.base = base
        self.root = Path(settings.adapters_dir).expanduser().resolve()
        self.stager = make_stager(settings)
        self.validator = AdapterValidator(
            self.root, base, settings.max_lora_rank, settings.max_adapter_bytes, self.stager,
            require_base_name=settings.require_adapter_base_name,
        )  # fmt: skip
        self.store = RegistryStore(settings.resolved_state_dir)
        self.metrics = AdapterMetrics(lambda: [a.state for a in list(self._adapters.values())], self.waiting)
        if metrics_registry is not None:
            metrics_registry.register(self.metrics)
        super().__init__()
        self._locks: dict[str, asyncio.Lock] = {}
        self.loader = AdapterLoader(
            pool,
            self.validator,
            self.metrics,
            settings.engine_adapter_slots,
            self._adapters,
            self._lock,
            self._served,
            first_load=lambda a: self._persist(),
            fetcher=ObjectFetcher(
                settings.resolved_state_dir / "objects",
                settings.object_cache_bytes,
                [(m.name, m.limit, m.required) for m in self.validator.members],
            ),
            wait_seconds=settings.adapter_wait_seconds,
            compile_profile=compile_profile,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: AdapterWatcher | None = None
        self._started = False

    # -- what the service and metrics see ----------------------------------------------------------

    async def target(self, name: str, wait: float | None = None) -> Target | None:
        """Where to send a request for adapter `name` (loading it on demand); None if no such adapter.
        A request for an adapter not in the engines waits for room (at most `wait` seconds, default the
        settings' ADAPTER_WAIT_SECONDS), joining a load of the same adapter already under way."""
        a = self._adapters.get(name)
        if a is None:
            return None
        if a.state == READY and a.current is not None and (live := self.loader.live(a.current)):
            return self._lease(a, a.current, live)  # the hot path: no lock, no await
        if a.state == AdapterState.FAILED:
            raise self._failed(a)
        if self.waiting() >= self.settings.max_queued * max(1, len(self.pool.engines)):
            raise Overloaded("Too many requests are waiting for adapters to load; retry shortly.", retry_after=1.0)
        deadline = time.monotonic() + (self.settings.adapter_wait_seconds if wait is None else wait)
        waiter = a
        waiter.waiting += 1
        try:
            async with self._locked(name, deadline):
                a = self._adapters.get(name)
                if a is None:
                    return None
                if a.state == AdapterState.FAILED:
                    raise self._failed(a)
                if not (a.state == READY and a.current is not None and self.loader.live(a.current)):
                    await self.loader.load_locked(a, max(0.0, deadline - time.monotonic()))
                assert a.current is not None
                live = self.loader.live(a.current)
                if not live:
                    raise EngineUnavailable(f"No engine is ready to serve adapter '{name}'; retry shortly.")
                return self._lease(a, a.current, live)
        finally:
            waiter.waiting -= 1

    @contextlib.asynccontextmanager
    async def _locked(self, name: str, deadline: float) -> AsyncIterator[None]:
        """The adapter's lock, waited for until `deadline` (a load of it under way may itself wait for room)."""
        lock = self._lock(name)
        try:
            await asyncio.wait_for(lock.acquire(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise AdapterWaitTimeout(
                f"Adapter '{name}' is still waiting for room in the engine; retry shortly, or raise "
                "GOVERNOR_MAX_CPU_LORAS.",
            ) from None
        try:
            yield
        finally:
            lock.release()

    def list(self) -> list[dict[str, Any]]:
        self._require_lora()
        return [self._adapters[n].describe() for n in sorted(self._adapters)]

    # -- admin operations --------------------------------------------------------------------------

    async def load(
        self, name: str, path: str, pin: bool | None = None, source: Source = "api", now: bool = True
    ) -> dict[str, Any]:
        """Register (or re-register) and load now; a changed folder becomes a new version (hot swap).
        `now=False` only registers it (checked for form, persisted): it loads on first use."""
        self._require_lora()
        try:
            check_name(name, self._served())
            if not now:
                self.loader.check_source(path)
        except GovernorError as exc:
            self.metrics.loads.labels("failed").inc()
            log.warning("adapter load refused: %s", exc.message)
            raise
        async with self._lock(name):
            old = a = self._adapters.get(name)
            if a is None or a.path != path:
                a = self._register(name, path, source, pinned=old is not None and old.pinned)
                if old is not None:  # same name, new folder: carry the loaded version so it is swapped, not leaked
                    a.current, a.state, a.lru, a.loaded_once = old.current, old.state, old.lru, old.loaded_once
            a.source = source if source == "api" else a.source
            if pin is not None:
                self._set_pin(a, pin)
            if not now:
                a.registered = True
                self._persist()
                return a.describe()
            try:
                await self.loader.load_locked(a)
            except BaseException:
                if old is not None and old is not a and self._adapters.get(name) is a:
                    # A refused new path is not recorded: the adapter keeps the path its serving version came from.
                    old.reason, old.pinned, old.lru = a.reason, a.pinned, a.lru
                    self._adapters[name] = old
                raise
            finally:
                self._persist()  # only adapters that loaded once are written: a refused one leaves no trace
            return a.describe()

    async def unload(self, name: str) -> dict[str, Any]:
        """Unregister and unload; requests in flight finish on the version they started with."""
        self._require_lora()
        async with self._lock(name):
            a = self._get(name)
            await self._remove(a, "api")
            return {**a.describe(), "removed": True}

    async def pin(self, name: str, on: bool = True) -> dict[str, Any]:
        """Pinned adapters are never evicted; pinning one that is not loaded loads it."""
        self._require_lora()
        async with self._lock(name):
            a = self._get(name)
            self._set_pin(a, on)
            self._persist()
            if on and a.state in (AdapterState.DISCOVERED, AdapterState.EVICTED) and self.pool.any_ready():
                await self.loader.load_locked(a)
            return a.describe()

    # -- watcher events ----------------------------------------------------------------------------

    async def folder_changed(self, folder_name: str) -> None:
        """A complete folder appeared or changed: load it, reload a changed one, or retry a failed one."""
        folder = self.root / folder_name
        a = next((x for x in self._adapters.values() if x.folder == folder), None)
        if a is None:
            if folder_name in self._adapters:
                log.warning("folder %r ignored: adapter '%s' is registered from another path", folder_name, folder_name)
                return
            try:
                check_name(folder_name, self._served())
            except InvalidRequest as exc:
                log.warning("folder %r ignored: %s", folder_name, exc.message)
                return
            a = self._register(folder_name, folder_name, "watch", pinned=False)
            log.info("adapter folder appeared", extra={"adapter": folder_name})
        elif a.state in (AdapterState.DISCOVERED, AdapterState.EVICTED):
            return  # not loaded: it is validated afresh when next used
        async with self._lock(a.name):
            if self._adapters.get(a.name) is not a:
                return
            try:
                await self.loader.load_locked(a)
            except GovernorError as exc:
                log.warning("adapter '%s' from folder not loaded: %s", a.name, exc.message)

    def knows_folder(self, folder_name: str) -> bool:
        folder = self.root / folder_name
        return any(a.folder == folder for a in self._adapters.values())

    async def folder_removed(self, folder_name: str) -> None:
        folder = self.root / folder_name
        for a in [x for x in self._adapters.values() if x.folder == folder or x.folder.is_relative_to(folder)]:
            async with self._lock(a.name):
                if self._adapters.get(a.name) is a:
                    log.info("adapter folder removed", extra={"adapter": a.name})
                    await self._remove(a, "removed")

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the persisted registry, scan and watch the root, and hook engine (re)starts."""
        if self._started:
            return
        self._started = True
        if not self.settings.lora:
            log.info("LoRA is disabled; the adapter registry is idle")
            return
        for engine in self.pool.engines:  # before any await, so no ready transition is missed
            engine.on_ready(self._engine_ready)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("adapters root %s unavailable: %s", self.root, exc)
        self.stager.clear()  # copies left by an earlier run: every load below stages afresh
        if self.stager.refusal:
            log.warning("%s", self.stager.refusal)
        for entry in self.store.load():
            try:
                check_name(entry["name"])
            except InvalidRequest:
                log.warning("ignoring persisted adapter with an invalid name: %r", entry["name"])
                continue
            self._register(entry["name"], entry["path"], entry["source"], entry["pinned"]).loaded_once = entry["loaded"]
        if self.settings.watch_adapters:
            for a in [x for x in self._adapters.values() if x.source == "watch" and not x.folder.is_dir()]:
                del self._adapters[a.name]
            for name in self._scan():
                if name not in self._adapters:
                    with contextlib.suppress(InvalidRequest):
                        check_name(name, self._served())
                        self._register(name, name, "watch", pinned=False)
            self._watcher = AdapterWatcher(self.root, self)
            self._watcher.start()
        self._persist()
        for engine in self.pool.engines:
            if engine.state == EngineState.READY:
                self._spawn(self._restore(engine))

    async def stop(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Wait for background work (restores, deferred unloads); for tests and orderly shutdown."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _engine_ready(self, engine: EngineClient) -> None:
        # Runs inside the engine's ready transition: hand the loads to a task so health checks go on.
        self._spawn(self._restore(engine))

    async def _restore(self, engine: EngineClient) -> None:
        await restore(engine, self._adapters, self._lock, self.loader, self.settings.engine_adapter_slots)

    # -- helpers -----------------------------------------------------------------------------------

    async def _remove(self, a: Adapter, reason: str) -> None:
        a.state = AdapterState.UNLOADING
        del self._adapters[a.name]
        self._persist()
        if a.current is not None:
            await self.loader.retire(a.current, reason)

    def _lease(self, a: Adapter, v: Version, live: Names) -> Target:
        v.leases += 1
        self.loader.touch(a)
        released = False

        def done() -> None:
            nonlocal released
            if released:
                return
            released = True
            v.leases -= 1
            self.loader.touch(a)  # in use until now: recency counts from the last use, not from its start
            if v.leases == 0:
                if v.retired is not None:
                    self._spawn(self.loader.drop(v))
                else:
                    self.loader.room_freed()  # idle now: evictable, so a waiting load may take its slot

        return Target(a.name, v.internal, adapter=a.name, profile=a.profile, engines=tuple(live), done=done)

    def _register(self, name: str, path: str, source: Source, pinned: bool) -> Adapter:
        origin = path if is_object_url(path) else None
        # An adapter from a store has no folder under the root: no watcher event ever names it.
        folder = Path(os.path.normpath(self.root / (".store" if origin else path)))
        a = Adapter(name=name, path=path, source=source, folder=folder, pinned=pinned, origin=origin)
        self._adapters[name] = a
        return a

    def _set_pin(self, a: Adapter, on: bool) -> None:
        # A pin holds one of the engine's adapter slots for good; one slot always stays free for the rest.
        most = self.settings.engine_adapter_slots - 1
        if on and not a.pinned and sum(x.pinned for x in self._adapters.values()) >= most:
            raise Conflict(
                f"Cannot pin more than {most} adapters: the engines hold {most + 1} (GOVERNOR_MAX_CPU_LORAS) and one "
                "stays free for unpinned adapters; unpin one first, or raise GOVERNOR_MAX_CPU_LORAS.",
                param="name",
            )
        if a.pinned and not on:
            self.loader.room_freed()
        a.pinned = on

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _served(self) -> str:
        return self.base.served_name or self.pool.served_model

    def _require_lora(self) -> None:
        if not self.settings.lora:
            raise InvalidRequest(
                "LoRA is disabled on this server (GOVERNOR_LORA=false); restart it with GOVERNOR_LORA=true to "
                "use adapters.",
                code="lora_disabled",
            )

    def _persist(self) -> None:
        # Adapters that loaded at least once (evicted and pinned ones included); pinned, then recent, first.
        kept = sorted((a for a in self._adapters.values() if a.loaded_once or a.registered),
                      key=lambda a: (not a.pinned, -a.lru))  # fmt: skip
        try:
            self.store.save([a.persisted() for a in kept])
        except OSError as exc:
            log.error("could not save adapter state to %s: %s", self.store.path, exc)

    def _scan(self) -> Names:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not is_temporary(p.name))
        except OSError:
            return []

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("adapter background task failed", exc_info=task.exception())
