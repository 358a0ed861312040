"""Many adapters contending for few engine slots (the fake engine over real HTTP): a burst for one adapter
loads it once, a Zipf mix is served without a refusal, and eviction never takes an adapter that requests
are waiting for, or one in use, while it has an idle one to take."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from governor.lora.adapter import Adapter, AdapterState
from governor.lora.registry import AdapterRegistry
from tests.lora.factory import AdapterFactory
from tests.lora.fixtures import Engine, wait_until
from tests.lora.test_registry import Make

SLOTS = 4
NAMES = [f"z{i:02d}" for i in range(16)]


def record_evictions(registry: AdapterRegistry) -> list[tuple[str, int, int, list[str]]]:
    """(victim, its waiting requests, its leases, idle loaded adapters besides it) at every eviction."""
    seen: list[tuple[str, int, int, list[str]]] = []
    evict = registry.loader.evict

    async def recording(victim: Adapter) -> None:
        assert victim.current is not None
        idle = [
            a.name for a in registry.loader.adapters.values()
            if a is not victim and a.state == AdapterState.READY and not a.pinned and a.waiting == 0
            and a.current is not None and a.current.leases == 0
        ]  # fmt: skip
        seen.append((victim.name, victim.waiting, victim.current.leases, idle))
        await evict(victim)

    registry.loader.evict = recording  # type: ignore[method-assign]
    return seen


async def start(make_registry: Make, root: Path, factory: AdapterFactory) -> AdapterRegistry:
    for name in NAMES:
        factory.copy("good", root / name)
    registry = make_registry(watch_adapters=True, max_loras=2, max_cpu_loras=SLOTS)
    await registry.start()
    await registry.wait_idle()  # the first SLOTS are loaded eagerly at start, the rest only registered
    assert sum(a["state"] == "ready" for a in registry.list()) == SLOTS
    return registry


async def test_a_burst_for_one_unloaded_adapter_loads_it_once(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    registry = await start(make_registry, root, factory)
    cold = next(a["name"] for a in registry.list() if a["state"] == "discovered")
    engine.fake.load_calls.clear()
    targets = await asyncio.gather(*(registry.target(cold) for _ in range(12)))
    assert engine.fake.load_calls == [cold]  # twelve requests, one load: the others joined it
    assert all(t is not None and t.adapter == cold for t in targets)
    for t in targets:
        assert t is not None
        t.done()


async def test_zipf_mix_on_four_slots_is_served_and_evicts_only_idle_adapters(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    registry = await start(make_registry, root, factory)
    evictions = record_evictions(registry)
    rng = random.Random(7)
    weights = [1 / (k + 1) for k in range(len(NAMES))]  # Zipf, s = 1
    served: dict[str, int] = dict.fromkeys(NAMES, 0)
    in_flight = asyncio.Semaphore(6)  # more adapters in use at once than the engine's 4 slots

    async def one(name: str, hold: float) -> None:
        async with in_flight:
            target = await registry.target(name, wait=30)
            assert target is not None and target.adapter == name
            await asyncio.sleep(hold)  # the request generating
            served[name] += 1
            target.done()

    picks = rng.choices(NAMES, weights, k=300)
    await asyncio.gather(*(one(name, rng.uniform(0, 0.01)) for name in picks))
    assert sum(served.values()) == 300  # no refusal, no timeout: every request was served
    assert evictions, "the mix never needed an eviction"
    for victim, waiting, leases, _idle in evictions:
        assert waiting == 0 and leases == 0, (victim, waiting, leases)
    loads = len(engine.fake.load_calls)
    print(f"zipf: 300 requests, {loads} loads, {len(evictions)} evictions")
    assert loads <= len(evictions) + len(NAMES), (loads, len(evictions))  # no load without a need for it
    # Resident top-4 adapters would serve ~61% of a Zipf(1) mix over 16: about 117 misses in 300. More than
    # half the requests loading would mean loads ping-pong between requests.
    assert loads < 150, loads
    await wait_until(lambda: registry.waiting() == 0, 5, "no request left waiting")
