"""The adapter registry against the fake vLLM engine over real HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from governor.engine.pool import EnginePool
from governor.errors import AdapterNotFound, Conflict, EngineUnavailable, InvalidRequest
from governor.lora.registry import AdapterRegistry
from tests.lora.factory import AdapterFactory
from tests.lora.fixtures import Engine, wait_until

Make = Callable[..., AdapterRegistry]


def swap_weights(factory: AdapterFactory, folder: Path) -> None:
    """A new push of the same adapter: other weights, same shapes."""
    tmp = folder / ".incoming.safetensors"
    shutil.copyfile(factory.golden("good2") / "adapter_model.safetensors", tmp)
    tmp.replace(folder / "adapter_model.safetensors")


def assert_staged(engine_path: str, source: Path, tmp_path: Path) -> Path:
    """The engine was given Governor's read-only copy under the state dir, byte-equal to `source`'s files."""
    staged = Path(engine_path)
    assert staged.parent == tmp_path / "state" / "staged", engine_path
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (staged / name).read_bytes() == (source / name).read_bytes()
        assert (staged / name).stat().st_mode & 0o222 == 0  # read-only
    assert staged.stat().st_mode & 0o222 == 0
    return staged


def state(registry: AdapterRegistry, name: str) -> str:
    return next(a["state"] for a in registry.list() if a["name"] == name)


async def test_load_then_target(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, tmp_path: Path
) -> None:
    factory.copy("good", root / "a")
    (root / "a" / "governor.json").write_text('{"preset": "strict"}')
    registry = make_registry()
    await registry.start()
    info = await registry.load("a", "a")
    assert info["state"] == "ready" and info["version"] == 1 and info["upstream_name"] == "a"
    assert set(engine.fake.loaded) == {"a"}
    assert_staged(engine.fake.loaded["a"], root / "a", tmp_path)
    target = await registry.target("a")
    assert target is not None
    assert (target.public_name, target.upstream_model, target.adapter) == ("a", "a", "a")
    assert target.profile == {"preset": "strict"} and target.engines == ("fake-0",)
    target.done()
    target.done()  # idempotent
    assert registry.list()[0]["in_flight"] == 0
    assert await registry.target("nope") is None
    assert registry.ready_names() == ["a"] and registry.known_names() == ["a"]


async def test_concurrent_targets_of_evicted_adapter_load_once(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    factory.copy("good", root / "a")
    factory.copy("good", root / "b")
    registry = make_registry(max_loras=1, max_cpu_loras=1)
    await registry.start()
    await registry.load("a", "a")
    await registry.load("b", "b")  # evicts a
    assert state(registry, "a") == "evicted" and "a" not in engine.fake.loaded
    engine.fake.load_calls.clear()

    targets = await asyncio.gather(*(registry.target("a") for _ in range(20)))

    assert engine.fake.load_calls == ["a"]  # one engine load (b's eviction is an unload)
    assert all(t is not None and t.upstream_model == "a" for t in targets)
    assert registry.list()[0]["in_flight"] == 20
    for t in targets:
        assert t is not None
        t.done()


async def test_lru_eviction_and_pinning(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    for name in "abcd":
        factory.copy("good", root / name)
    metrics = CollectorRegistry()
    settings_registry = make_registry(max_loras=2, max_cpu_loras=3)
    registry = AdapterRegistry(settings_registry.settings, settings_registry.pool, settings_registry.base, metrics)
    await registry.start()
    await registry.load("a", "a", pin=True)
    await registry.load("b", "b")
    await registry.load("c", "c")
    used = await registry.target("a")  # a is now the most recently used; it is pinned anyway
    assert used is not None
    used.done()
    await registry.load("d", "d")  # evicts b (least recently used, unpinned)
    listed = {x["name"]: (x["state"], x["tier"]) for x in registry.list()}
    assert listed == {"a": ("ready", "engine"), "b": ("evicted", "registry"), "c": ("ready", "engine"),
                      "d": ("ready", "engine")}  # fmt: skip
    assert registry.ready_names() == ["a", "c", "d"] and registry.servable_names() == ["a", "b", "c", "d"]
    assert set(engine.fake.loaded) == {"a", "c", "d"}

    # c and d have requests in flight, a is pinned: b waits for room instead of being refused ...
    held = [await registry.target("c"), await registry.target("d")]
    waiting = asyncio.ensure_future(registry.target("b"))
    await wait_until(lambda: registry.loader.waiting_for_room == 1, 5, "b to wait for room")
    assert registry.waiting() == 1 and registry.waiting_by_name() == {"b": 1} and state(registry, "b") == "evicted"
    assert "governor_adapter_requests_waiting 1.0" in generate_latest(metrics).decode()
    held[1].done()  # ... and takes d's slot the moment d is idle
    got = await asyncio.wait_for(waiting, 5)
    assert got is not None and got.upstream_model == "b" and set(engine.fake.loaded) == {"a", "b", "c"}
    got.done()
    held[0].done()
    # Past its wait a request gets 503 adapter_wait_timeout with Retry-After, never 409.
    held = [await registry.target("b"), await registry.target("c")]
    with pytest.raises(EngineUnavailable) as info:
        await registry.target("d", wait=0.2)
    assert (info.value.status, info.value.code) == (503, "adapter_wait_timeout")
    assert info.value.headers() == {"Retry-After": "1"}
    assert state(registry, "d") == "evicted" and registry.waiting() == 0  # not poisoned: loads once a slot frees
    for t in held:
        t.done()

    await registry.pin("a", False)
    await registry.load("d", "d")  # now a (least recently used, unpinned) goes
    assert set(engine.fake.loaded) == {"b", "c", "d"}
    await registry.pin("b", True)
    await registry.pin("c", True)
    with pytest.raises(Conflict):  # one engine slot always stays free for unpinned adapters
        await registry.pin("a", True)
    assert (await registry.load("a", "a"))["state"] == "ready"  # evicting d, the only unpinned one
    assert set(engine.fake.loaded) == {"a", "b", "c"}

    text = generate_latest(metrics).decode()
    assert "governor_adapter_evictions_total 4.0" in text
    assert 'governor_adapter_unloads_total{reason="evicted"} 4.0' in text
    assert 'governor_adapter_loads_total{result="ok"}' in text
    assert 'governor_adapters{state="evicted"} 1.0' in text
    assert "governor_adapter_load_seconds_bucket" in text


async def test_hot_swap_keeps_old_version_until_lease_released(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    folder = factory.copy("good", root / "a")
    registry = make_registry()
    await registry.start()
    await registry.load("a", "a")
    old = await registry.target("a")
    assert old is not None and old.upstream_model == "a"

    swap_weights(factory, folder)
    info = await registry.load("a", "a")
    assert info["version"] == 2 and info["upstream_name"] == "a@2"
    assert set(engine.fake.loaded) == {"a", "a@2"}  # the old version serves its request in flight
    new = await registry.target("a")
    assert new is not None and new.upstream_model == "a@2"

    old.done()
    await wait_until(lambda: "a" not in engine.fake.loaded, 5, "old version unloaded")
    assert set(engine.fake.loaded) == {"a@2"}
    new.done()
    # Loading the unchanged folder again is a no-op: no new version, no engine call.
    calls = len(engine.fake.load_calls)
    assert (await registry.load("a", "a"))["version"] == 2
    assert len(engine.fake.load_calls) == calls


async def test_bad_reload_keeps_serving(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    folder = factory.copy("good", root / "a")
    registry = make_registry()
    await registry.start()
    await registry.load("a", "a")
    (folder / "adapter_model.bin").write_bytes(b"not really")
    with pytest.raises(InvalidRequest):
        await registry.load("a", "a")
    [info] = registry.list()
    assert info["state"] == "ready" and "still serving version 1" in info["reason"]
    target = await registry.target("a")
    assert target is not None and target.upstream_model == "a"
    target.done()


async def test_failed_adapter_conflict_then_fixed(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    factory.copy("rank32", root / "a")
    registry = make_registry(max_lora_rank=16)
    await registry.start()
    with pytest.raises(InvalidRequest) as info:
        await registry.load("a", "a")
    assert info.value.param == "rank"
    assert state(registry, "a") == "failed" and registry.servable_names() == [] and registry.known_names() == ["a"]
    with pytest.raises(Conflict) as conflict:
        await registry.target("a")
    assert conflict.value.status == 409
    assert "failed to load" in conflict.value.message and "POST /admin/adapters again" in conflict.value.message
    shutil.rmtree(root / "a")
    factory.copy("good", root / "a")
    assert (await registry.load("a", "a"))["state"] == "ready"


async def test_engine_refusal_fails_with_its_message(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    factory.copy("good", root / "a")
    engine.fake.refuse["a"] = "Loading lora a failed: no adapter found"
    registry = make_registry()
    await registry.start()
    with pytest.raises(InvalidRequest) as info:
        await registry.load("a", "a")
    assert "no adapter found" in info.value.message
    [entry] = registry.list()
    assert entry["state"] == "failed" and "no adapter found" in entry["reason"]


async def test_unreachable_engine_is_503_and_not_poisoned(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    factory.copy("good", root / "a")
    registry = make_registry()
    await registry.start()
    await engine.runner.cleanup()
    with pytest.raises(EngineUnavailable) as info:
        await registry.load("a", "a")
    assert info.value.status == 503
    assert state(registry, "a") == "discovered"
    engine.fake.loaded.clear()
    await engine.restart()
    await wait_until(lambda: engine.remote.state.value == "ready", 10, "engine ready again")
    target = await registry.target("a")
    assert target is not None and "a" in engine.fake.loaded
    target.done()


async def test_restore_after_engine_restart(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    for name in "ab":
        factory.copy("good", root / name)
    registry = make_registry()
    await registry.start()
    await registry.load("a", "a")
    await registry.load("b", "b", pin=True)
    generation = engine.remote.generation

    fresh = await engine.restart()  # a new process: it has no adapters

    await wait_until(lambda: set(fresh.loaded) == {"a", "b"}, 10, "adapters restored on the new engine")
    assert engine.remote.generation == generation + 1
    await registry.wait_idle()
    assert {x["state"] for x in registry.list()} == {"ready"}
    target = await registry.target("a")
    assert target is not None and target.upstream_model == "a"
    target.done()


async def test_unload_waits_for_requests_in_flight(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory
) -> None:
    factory.copy("good", root / "a")
    registry = make_registry()
    await registry.start()
    await registry.load("a", "a")
    held = await registry.target("a")
    assert held is not None
    info = await registry.unload("a")
    assert info["removed"] and info["in_flight"] == 1
    assert await registry.target("a") is None and registry.known_names() == []
    assert "a" in engine.fake.loaded  # still serving the request in flight
    held.done()
    await wait_until(lambda: "a" not in engine.fake.loaded, 5, "unloaded after the last request")
    with pytest.raises(AdapterNotFound):
        await registry.unload("a")


async def test_persistence_round_trip(
    make_registry: Make, engine: Engine, root: Path, factory: AdapterFactory, tmp_path: Path
) -> None:
    for name in "ab":
        factory.copy("good", root / name)
    first = make_registry()
    await first.start()
    await first.load("a", "a", pin=True)
    await first.load("b", "b")
    await first.stop()
    saved = json.loads((tmp_path / "state" / "adapters.json").read_text())
    assert sorted((e["name"], e["path"], e["pinned"], e["source"]) for e in saved["adapters"]) == [
        ("a", "a", True, "api"), ("b", "b", False, "api"),
    ]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["adapters.json", "staged"]  # no temp files
    assert not [p for p in (tmp_path / "state" / "staged").iterdir() if p.name.startswith(".")]

    engine.fake.loaded.clear()  # a fresh gateway against a fresh engine
    second = make_registry()
    await second.start()
    await wait_until(lambda: set(engine.fake.loaded) == {"a", "b"}, 10, "persisted adapters loaded")
    await second.wait_idle()
    assert {x["name"]: (x["state"], x["pinned"]) for x in second.list()} == {
        "a": ("ready", True), "b": ("ready", False),
    }  # fmt: skip


async def test_lora_disabled(make_registry: Make, root: Path) -> None:
    registry = make_registry(lora=False)
    await registry.start()
    for call in (registry.load("a", "a"), registry.unload("a"), registry.pin("a")):
        with pytest.raises(InvalidRequest) as info:
            await call
        assert "GOVERNOR_LORA=false" in info.value.message
    assert await registry.target("a") is None


async def test_engine_pool_without_ready_engine(tmp_path: Path, base_info, root: Path, factory: AdapterFactory) -> None:  # type: ignore[no-untyped-def]
    from governor.engine.remote import RemoteEngine
    from tests.lora.fixtures import make_settings

    factory.copy("good", root / "a")
    down = RemoteEngine("down", "http://127.0.0.1:9")
    registry = AdapterRegistry(make_settings(tmp_path), EnginePool([down], 10), base_info)
    await registry.start()
    with pytest.raises(EngineUnavailable):
        await registry.load("a", "a")
    assert state(registry, "a") == "discovered"
    await registry.stop()


def test_state_file_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from governor.lora import store as store_mod
    from governor.lora.store import RegistryStore

    store = RegistryStore(tmp_path)
    count = store_mod.MAX_ENTRIES + 100
    entries = [{"name": f"a{i}", "path": f"a{i}", "pinned": False, "source": "api"} for i in range(count)]
    store.save(entries)
    loaded = store.load()
    assert len(loaded) == store_mod.MAX_ENTRIES and loaded[0]["name"] == "a0" and loaded[0]["loaded"]
    store.path.write_text(" " * (store_mod.MAX_BYTES + 1))
    assert store.load() == []
    assert "larger than" in caplog.text
