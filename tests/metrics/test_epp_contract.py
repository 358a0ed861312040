"""Governor's /metrics read as the endpoint picker reads a vLLM-type model server (tests/metrics/epp.py),
in front of a fake vLLM with LoRA slots (tests/metrics/slot_engine.py): running and waiting adapters
told apart, public names only after a hot-swap, idle adapters visible after an eviction, /v1/models
with each adapter's parent. The same contract against the real engine: tests/integration/
test_epp_contract_live.py."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from typing import Any

import httpx

from governor.bench.fake_adapter import write_adapter
from tests.api.conftest import ADMIN, Gateway, GatewayFactory, chat_body, gateway  # noqa: F401
from tests.metrics import epp
from tests.metrics.slot_engine import SlotEngine

AUTH = {"Authorization": f"Bearer {ADMIN}"}


async def load(gw: Gateway, name: str, **extra: Any) -> dict[str, Any]:
    if not (gw.settings.adapters_dir / name).exists():
        write_adapter(gw.settings.adapters_dir, name)
    r = await gw.client.post("/admin/adapters", json={"name": name, "path": name, **extra}, headers=AUTH)
    assert r.status_code == 200, r.text
    return dict(r.json())


def ask(gw: Gateway, model: str) -> asyncio.Task[httpx.Response]:
    body = chat_body(model=model, stream=True, max_tokens=4)
    return asyncio.ensure_future(gw.client.post("/v1/chat/completions", json=body, headers=AUTH))


async def view(gw: Gateway) -> tuple[epp.EndpointMetrics, str]:
    r = await gw.client.get("/metrics")
    assert r.status_code == 200
    return epp.read(r.text), r.text


async def until(gw: Gateway, ok: Callable[[epp.EndpointMetrics], bool], what: str) -> tuple[epp.EndpointMetrics, str]:
    deadline = time.monotonic() + 10
    while True:
        seen, text = await view(gw)
        if ok(seen):
            return seen, text
        assert time.monotonic() < deadline, f"{what}: the picker saw {seen}"
        await asyncio.sleep(0.02)


def loaded(text: str) -> dict[str, tuple[float, str]]:
    """governor_adapter_loaded: adapter → (value, pinned)."""
    return {s.labels["adapter"]: (s.value, s.labels["pinned"]) for s in epp.parse(text)["governor_adapter_loaded"]}


async def engine_read_since(gw: Gateway, since: float) -> str:
    """A scrape whose copy of the engine's /metrics was fetched after `since` (copies refresh each second)."""
    deadline = time.monotonic() + 10
    while True:
        text = (await gw.client.get("/metrics")).text
        age = epp.parse(text)["governor_engine_metrics_age_seconds"][0].value
        if time.monotonic() - age > since:
            return text
        assert time.monotonic() < deadline, "the engine's metrics were not read again"
        await asyncio.sleep(0.05)


def no_version_suffix(text: str) -> None:
    marked = sorted(v for v in epp.label_values(text) if "@" in v)
    assert not marked, f"label values with a version suffix: {marked}"


async def finish(gw: Gateway, fake: SlotEngine, tasks: list[asyncio.Task[httpx.Response]]) -> None:
    fake.hold.set()
    for r in await asyncio.gather(*tasks):
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]


async def test_running_and_waiting_adapters_are_told_apart(gateway: GatewayFactory) -> None:  # noqa: F811
    fake = SlotEngine(slots=2)
    gw = await gateway(fake=fake, admin_key=ADMIN, max_loras=4)
    for name in ("ad-a", "ad-b", "ad-c"):
        await load(gw, name)
    idle, text = await view(gw)
    assert (idle.waiting_queue_size, idle.running_requests_size) == (0, 0)
    assert idle.active_models == idle.waiting_models == set() and idle.max_active_models == 4
    assert (idle.kv_cache_usage_percent, idle.cache_block_size, idle.cache_num_blocks) == (0.25, 16, 2048)
    assert loaded(text) == {"ad-a": (1.0, "false"), "ad-b": (1.0, "false"), "ad-c": (1.0, "false")}

    tasks = [ask(gw, "ad-a"), ask(gw, "ad-b"), ask(gw, "fake-model")]
    await until(gw, lambda m: m.running_requests_size == 3, "three requests generating")
    tasks.append(ask(gw, "ad-c"))  # the engine's two slots are taken: it waits for one
    seen, text = await until(gw, lambda m: m.waiting_queue_size == 1, "ad-c waiting")
    assert seen.active_models == {"ad-a", "ad-b"} and seen.waiting_models == {"ad-c"}, seen
    assert seen.running_requests_size == 3 and seen.max_active_models == 4
    # One lora_requests_info series (Governor's), not the engine's one beside it.
    assert len(epp.parse(text)["vllm:lora_requests_info"]) == 1
    assert "vllm:lora_request_success_total" in text  # the re-export is on: its adapters are public names here
    no_version_suffix(text)

    await finish(gw, fake, tasks)
    done, _ = await until(gw, lambda m: m.running_requests_size + m.waiting_queue_size == 0, "all finished")
    assert done.active_models == done.waiting_models == set()

    models = (await gw.client.get("/v1/models")).json()["data"]
    parents = {m["id"]: m["parent"] for m in models}
    assert parents == {"fake-model": None, "ad-a": "fake-model", "ad-b": "fake-model", "ad-c": "fake-model"}


async def test_hot_swap_shows_only_the_public_name(gateway: GatewayFactory) -> None:  # noqa: F811
    fake = SlotEngine(slots=2)
    gw = await gateway(fake=fake, admin_key=ADMIN)
    await load(gw, "swap")
    tasks = [ask(gw, "swap")]
    await until(gw, lambda m: m.active_models == {"swap"}, "the first version generating")
    folder = gw.settings.adapters_dir / "swap"
    shutil.rmtree(folder)
    write_adapter(gw.settings.adapters_dir, "swap", rank=8)  # new weights: a new version upstream
    assert (await load(gw, "swap"))["upstream_name"] == "swap@2"
    tasks.append(ask(gw, "swap"))
    seen, text = await until(gw, lambda m: m.running_requests_size == 2, "both versions generating")
    assert set(fake.batch) == {"swap", "swap@2"}, "the engine runs both versions"
    text = await engine_read_since(gw, time.monotonic())  # its own series now name swap@2
    seen = epp.read(text)
    assert 'vllm:lora_request_success_total{engine="fake-0",lora_name="swap"}' in text
    assert seen.active_models == {"swap"} and seen.waiting_models == set(), seen
    no_version_suffix(text)
    assert loaded(text) == {"swap": (1.0, "false")}
    await finish(gw, fake, tasks)
    _, text = await until(gw, lambda m: m.running_requests_size == 0, "both finished")
    no_version_suffix(text)


async def test_evicted_adapters_are_registered_but_not_loaded(gateway: GatewayFactory) -> None:  # noqa: F811
    fake = SlotEngine(slots=2)
    gw = await gateway(fake=fake, admin_key=ADMIN, max_loras=2, max_cpu_loras=2)
    await load(gw, "ev-a")
    await load(gw, "ev-b", pin=True)
    await load(gw, "ev-c")  # beyond the two slots: ev-a (least recently used, not pinned) is evicted
    seen, text = await view(gw)
    assert loaded(text) == {"ev-a": (0.0, "false"), "ev-b": (1.0, "true"), "ev-c": (1.0, "false")}
    assert seen.active_models == seen.waiting_models == set() and seen.max_active_models == 2
    ids = {m["id"] for m in (await gw.client.get("/v1/models")).json()["data"]}
    assert ids == {"fake-model", "ev-a", "ev-b", "ev-c"}  # every registered adapter, loaded or not
    tiers = {s.labels["adapter"]: s.labels["tier"] for s in epp.parse(text)["governor_adapter_loaded"]}
    assert tiers == {"ev-a": "registry", "ev-b": "engine", "ev-c": "engine"}

    tasks = [ask(gw, "ev-a")]  # loaded again on demand; ev-c goes (ev-b is pinned)
    seen, text = await until(gw, lambda m: m.active_models == {"ev-a"}, "ev-a generating")
    assert loaded(text) == {"ev-a": (1.0, "false"), "ev-b": (1.0, "true"), "ev-c": (0.0, "false")}
    assert seen.waiting_models == set()
    await finish(gw, fake, tasks)


async def test_lora_info_value_is_the_newest_timestamp(gateway: GatewayFactory) -> None:  # noqa: F811
    gw = await gateway(fake=SlotEngine(), admin_key=ADMIN)
    before = time.time()
    first = epp.parse((await gw.client.get("/metrics")).text)["vllm:lora_requests_info"]
    second = epp.parse((await gw.client.get("/metrics")).text)["vllm:lora_requests_info"]
    assert len(first) == len(second) == 1
    assert before - 1 <= first[0].value <= second[0].value <= time.time() + 1
