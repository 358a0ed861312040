"""AdapterLoader: moves adapters through validate → load → ready | failed, makes room by LRU eviction, and
retires replaced or removed versions once their last request finishes. Callers hold the adapter's lock.

`slots` serialises "make room + engine load" across names so two loads never both take the last slot;
victims are taken only when their own lock is free, so no lock ever waits on another.

The engine is given the staged copy validation made (staging.py), never the user's folder; a version holds a
reference to its copy until it is unloaded, so the copy lives exactly as long as an engine may read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from governor.engine.base import EngineClient, EngineState
from governor.engine.pool import EnginePool
from governor.errors import AdapterWaitTimeout, EngineUnavailable, GovernorError, InvalidRequest
from governor.lora.adapter import Adapter, AdapterState, Version, internal_name
from governor.lora.metrics import AdapterMetrics
from governor.lora.objects import ObjectFetcher, is_object_url
from governor.lora.upstream import load_on, unload_on
from governor.lora.validate import AdapterValidator, ValidatedAdapter, resolve_folder

log = logging.getLogger("governor.lora")
READY = AdapterState.READY


class AdapterLoader:
    """The engine side of the state machine, shared by the registry's API, watcher events and restores."""

    def __init__(
        self,
        pool: EnginePool,
        validator: AdapterValidator,
        metrics: AdapterMetrics,
        capacity: int,
        adapters: dict[str, Adapter],
        lock: Callable[[str], asyncio.Lock],
        served: Callable[[], str],
        first_load: Callable[[Adapter], None] = lambda a: None,
        *,
        fetcher: ObjectFetcher,
        wait_seconds: float = 60.0,
        compile_profile: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        self.pool = pool
        self.validator = validator
        self.metrics = metrics
        self.capacity = capacity  # adapters registered in each engine at once (the engine tier)
        self.wait_seconds = wait_seconds  # longest a load waits for room when no wait is given
        self.adapters = adapters  # the registry's dict, shared: eviction picks victims from it
        self.lock = lock
        self.served = served
        self.first_load = first_load  # the registry persists adapters once they have loaded
        self.stager = validator.stager
        self.fetcher = fetcher
        # Called between validation and the engine load; tests widen that window with it.
        self.after_validation: Callable[[ValidatedAdapter], Awaitable[None]] | None = None
        self.numbers: dict[str, int] = {}  # last version number per name: internal names are never reused
        # The policy's compile_profile: a bad governor.json fails the adapter when it loads, with the
        # reason, instead of every request to it (None: profiles are checked per request).
        self.compile_profile = compile_profile
        self._slots = asyncio.Lock()
        self._room = asyncio.Event()  # set (and replaced) whenever room may have appeared
        self.waiting_for_room = 0  # loads waiting now for an engine slot
        self._tick = 0

    async def load_locked(self, a: Adapter, wait: float | None = None) -> None:
        """Validate, then load the current version on every ready engine missing it, or a new version.
        With every engine slot busy it waits up to `wait` seconds (default: wait_seconds) for one to free."""
        engines = self.pool.ready()
        if not engines:
            raise EngineUnavailable(f"No engine is ready to load adapter '{a.name}'; retry shortly.")
        started = time.perf_counter()
        before = a.state
        occupying = before == READY  # holds a slot already: a reload or restore needs no room
        serving = occupying and a.current is not None and bool(self.live(a.current))
        if not serving:
            a.state = AdapterState.VALIDATING
        try:
            checked = await asyncio.to_thread(self._validate, a)
        except GovernorError as exc:
            self.fail(a, exc, serving)
            raise
        except Exception as exc:  # a check that broke on these files: the adapter fails, it is not left validating
            err = unexpected(a, "validated", exc)
            self.fail(a, err, serving)
            raise err from exc
        except BaseException:  # cancelled while validating: the adapter is as it was
            if not serving:
                a.state = before
            raise
        took, old = False, None  # whether a version took over validation's reference to the staged copy
        try:
            profile: object = checked.profile
            if checked.profile is not None and self.compile_profile is not None:
                try:
                    profile = self.compile_profile(checked.profile)
                except GovernorError as exc:
                    self.fail(a, exc, serving)
                    raise
                except Exception as exc:
                    err = unexpected(a, "compiled (governor.json)", exc)
                    self.fail(a, err, serving)
                    raise err from exc
            if self.after_validation is not None:
                await self.after_validation(checked)
            deadline = time.monotonic() + (self.wait_seconds if wait is None else wait)
            took, old = await self._load_checked(a, checked, engines, before, occupying, serving, started, deadline)
            a.profile = profile
        finally:
            if not took:
                self.stager.release(checked.fingerprint)
        if old is not None:
            await self.retire(old, "replaced")

    def _validate(self, a: Adapter) -> ValidatedAdapter:
        """Validate and stage the adapter's files: its folder under the root, or a fresh fetch from its store."""
        if a.origin is None:
            return self.validator.validate(a.name, a.path, self.served())
        fetched = self.fetcher.fetch(a.name, a.origin)
        checked = self.validator.validate(a.name, fetched.folder.name, self.served(), root=fetched.folder.parent)
        a.origin_version = fetched.version
        return checked

    def check_source(self, path: str) -> None:
        """A cheap check of where an adapter is registered from (a register-only call fetches nothing)."""
        if is_object_url(path):
            self.fetcher.check(path)
        else:
            resolve_folder(self.validator.root, path)

    async def _load_checked(
        self, a: Adapter, checked: ValidatedAdapter, engines: list[EngineClient], before: AdapterState,
        occupying: bool, serving: bool, started: float, deadline: float,
    ) -> tuple[bool, Version | None]:  # fmt: skip
        """(whether the version took the staged copy's reference, the version it replaced)."""
        v = a.current
        if v is not None and v.fingerprint == checked.fingerprint:
            missing = [e for e in engines if v.engines.get(e.name) != e.generation]
            fresh = False
        else:
            number = self.numbers.get(a.name, 0) + 1
            v = Version(internal_name(a.name, number), number, checked.fingerprint)
            missing, fresh = engines, True
        a.profile = checked.profile
        if not missing:
            a.state, a.reason = READY, None
            return False, None
        while True:
            async with self._slots:
                try:
                    if occupying or await self.make_room(a):
                        if not serving:
                            a.state = AdapterState.LOADING
                        await self._engine_load(v, missing)
                        break
                except EngineUnavailable:
                    a.state = before  # not the adapter's fault: keep its state, the caller may retry
                    raise
                except GovernorError as exc:
                    self.fail(a, exc, serving)
                    raise
                room = self._room
            if not serving:
                a.state = before  # known, not in the engines: what it is while it waits
            try:
                await self._wait_for_room(a, room, deadline)
            except BaseException:  # timed out, or the request went away: the adapter is as it was
                a.state = before
                raise
        old = None
        if fresh:
            self.numbers[a.name] = v.number
            old, a.current = a.current, v
        took = fresh or not v.holds_copy  # an evicted version gave its copy up; it holds this one now
        v.holds_copy = True
        elapsed = time.perf_counter() - started
        a.state, a.reason, a.loaded_at, a.load_seconds = READY, None, time.time(), round(elapsed, 4)
        self.touch(a)
        self.metrics.loads.labels("ok").inc()
        self.metrics.load_seconds.observe(elapsed)
        log.info("adapter loaded", extra={"adapter": a.name, "upstream": v.internal, "seconds": round(elapsed, 4)})
        if not a.loaded_once:
            a.loaded_once = True
            self.first_load(a)
        return took, old

    async def _engine_load(self, v: Version, engines: list[EngineClient]) -> None:
        loaded: list[EngineClient] = []
        path = self.stager.engine_path(v.fingerprint)
        try:
            for engine in engines:
                await load_on(engine, v.internal, path)
                v.engines[engine.name] = engine.generation
                loaded.append(engine)
        except GovernorError:
            for engine in loaded:  # all or nothing across engines
                with contextlib.suppress(GovernorError):
                    await unload_on(engine, v.internal)
                v.engines.pop(engine.name, None)
            raise

    def fail(self, a: Adapter, exc: GovernorError, serving: bool) -> None:
        self.metrics.loads.labels("failed").inc()
        if serving and a.current is not None:
            # A bad new push does not take down a working adapter: keep serving the loaded version.
            a.reason = f"reload failed: {exc.message}; still serving version {a.current.number}"
        else:
            a.state, a.reason = AdapterState.FAILED, exc.message
        log.warning("adapter failed to load: %s", exc.message, extra={"adapter": a.name})

    async def make_room(self, a: Adapter) -> bool:
        """Evict least-recently-used idle adapters until `a` fits; False when none can go now (the caller
        waits). Never pinned ones, ones with requests in flight, or ones with requests waiting to use them."""
        while True:
            occupied = [x for x in self.adapters.values() if x is not a and x.state == READY]
            if len(occupied) < self.capacity:
                return True
            victims = [
                x for x in occupied
                if not x.pinned and x.waiting == 0 and x.current is not None and x.current.leases == 0
                and not self.lock(x.name).locked()
            ]  # fmt: skip
            if not victims:
                return False
            await self.evict(min(victims, key=lambda x: x.lru))

    async def _wait_for_room(self, a: Adapter, room: asyncio.Event, deadline: float) -> None:
        """Wait until a slot may have freed (a lease ended, an adapter went or was unpinned), or refuse at the
        deadline with 503 + Retry-After: the engine is full of adapters in use, not the request wrong."""
        self.waiting_for_room += 1
        try:
            await asyncio.wait_for(room.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise AdapterWaitTimeout(
                f"Adapter '{a.name}' waited for room in the engine and every one of its {self.capacity} adapter "
                "slots stayed in use (pinned, or serving requests); retry shortly, or raise GOVERNOR_MAX_CPU_LORAS.",
                retry_after=1.0,
            ) from None
        finally:
            self.waiting_for_room -= 1

    def room_freed(self) -> None:
        """Wake every load waiting for a slot: each checks again (in turn, under the slots lock)."""
        self._room.set()
        self._room = asyncio.Event()

    async def evict(self, victim: Adapter) -> None:
        lock = self.lock(victim.name)
        await lock.acquire()  # free (checked by the caller, no await since): returns at once
        try:
            assert victim.current is not None
            victim.state = AdapterState.UNLOADING
            await self.unload_engines(victim.current)
            self.release_copy(victim.current)  # no engine reads it; a reload validates and stages afresh
            victim.state = AdapterState.EVICTED
            self.room_freed()
            self.metrics.evictions.inc()
            self.metrics.unloads.labels("evicted").inc()
            log.info("adapter evicted (LRU)", extra={"adapter": victim.name})
        finally:
            lock.release()

    async def retire(self, v: Version, reason: str) -> None:
        """Unload a replaced/removed version now, or when its last request finishes."""
        v.retired = reason
        if v.leases == 0:
            await self.drop(v)

    async def drop(self, v: Version) -> None:
        if v.unloaded:
            return
        v.unloaded = True
        had = bool(v.engines)
        try:
            await self.unload_engines(v)
        finally:
            self.release_copy(v)  # no engine reads this version's copy any more
        self.room_freed()
        if had:
            self.metrics.unloads.labels(v.retired or "api").inc()
            log.info("adapter version unloaded", extra={"upstream": v.internal, "reason": v.retired})

    def release_copy(self, v: Version) -> None:
        if v.holds_copy:
            v.holds_copy = False
            self.stager.release(v.fingerprint)

    async def unload_engines(self, v: Version) -> None:
        for engine in self.pool.engines:
            # Only where this version lives now: an engine restarted since has forgotten it anyway.
            if v.engines.get(engine.name) == engine.generation and engine.state == EngineState.READY:
                try:
                    await unload_on(engine, v.internal)
                except EngineUnavailable as exc:
                    log.warning("unload skipped: %s", exc.message, extra={"upstream": v.internal})
        v.engines.clear()

    # -- helpers -----------------------------------------------------------------------------------

    def live(self, v: Version) -> list[str]:
        return [
            e.name for e in self.pool.engines if e.state == EngineState.READY and v.engines.get(e.name) == e.generation
        ]

    def touch(self, a: Adapter) -> None:
        self._tick += 1
        a.lru, a.last_used = self._tick, time.time()


def unexpected(a: Adapter, step: str, exc: Exception) -> GovernorError:
    """A refusal for an exception no check anticipated: the adapter's files caused it, so a 4xx that fails the
    adapter, with the exception's type only (its text may hold server paths); the traceback goes to the log."""
    log.error("adapter could not be %s", step, exc_info=exc, extra={"adapter": a.name})
    return InvalidRequest(
        f"Adapter '{a.name}' could not be {step}: checking its files raised {type(exc).__name__}. Fix "
        "adapter_config.json, the weights or governor.json; the server log has the details.",
        param="path",
        code="adapter_validation_failed",
    )
