"""The model-server contract against the real engine (the session's `live` Governor, no extra engine start):
/metrics read the way the endpoint picker reads a vLLM-type server (tests/metrics/epp.py) while more
adapters ask for the engine than it has batch slots (GOVERNOR_MAX_LORAS, 4) and after a hot-swap; /v1/models
names each adapter's parent. The fast version, evicted adapters' series too: tests/metrics/test_epp_contract.py."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Live, wait_for
from tests.integration.adapters import random_adapter
from tests.integration.placed import unique
from tests.metrics import epp

pytestmark = pytest.mark.engine

SLOTS = 4  # GOVERNOR_MAX_LORAS' default, which the live server runs with
RUN = unique("epp")  # names no other test uses
NAMES = [f"{RUN}-{i}" for i in range(SLOTS + 1)]
SWAP = f"{RUN}-swap"
View = tuple[epp.EndpointMetrics, str]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("epp-adapters")
    random_adapter(root / "one", 61)
    random_adapter(root / "two", 62)
    return root


@pytest.fixture(scope="module", autouse=True)
def unload_after(live: Live) -> Iterator[None]:
    """Give the session engine's LoRA slots back: unload and delete this module's adapters, and only them.
    Adapters other tests placed are not in use while it runs, so they take no batch slot."""
    yield
    for name in [*NAMES, SWAP]:
        httpx.delete(f"{live.url}/admin/adapters/{name}", headers=live.admin(), timeout=60)
        shutil.rmtree(live.adapters_dir / ".api" / name, ignore_errors=True)


def admin_load(live: Live, name: str) -> dict[str, object]:
    r = httpx.post(live.url + "/admin/adapters", headers=live.admin(), json={"name": name, "path": f".api/{name}"},
                   timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    return dict(r.json())


def scrape(live: Live) -> str:
    r = httpx.get(live.url + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def no_version_suffix(text: str) -> None:
    marked = sorted(v for v in epp.label_values(text) if "@" in v)
    assert not marked, f"label values with a version suffix: {marked}"


def loaded(text: str) -> dict[str, float]:
    return {s.labels["adapter"]: s.value for s in epp.parse(text)["governor_adapter_loaded"]}


def stream(live: Live, model: str, max_tokens: int, results: list[str], prompt: str = "Tell a long story:") -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "decoding_preset": "off"}  # fmt: skip
    with httpx.stream("POST", live.v1 + "/completions", json=body, timeout=300) as r:
        text = "".join(r.iter_text())
    results.append("ok" if r.status_code == 200 and text.rstrip().endswith("data: [DONE]") else f"{r.status_code}")


def watch(live: Live, threads: list[threading.Thread]) -> list[View]:
    """The picker's view every ~50 ms until every request thread is done."""
    for t in threads:
        t.start()
    views = []
    while any(t.is_alive() for t in threads):
        text = scrape(live)
        views.append((epp.read(text), text))
        time.sleep(0.05)
    for t in threads:
        t.join()
    return views


def views_until(live: Live, done: Callable[[epp.EndpointMetrics], bool], timeout: float = 120) -> list[View]:
    """The picker's view, scraped back to back, until `done` holds for one."""
    views: list[View] = []
    deadline = time.monotonic() + timeout
    while not views or not done(views[-1][0]):
        assert time.monotonic() < deadline, f"timed out; last views: {[v for v, _ in views[-5:]]}"
        text = scrape(live)
        views.append((epp.read(text), text))
    return views


def test_epp_reads_running_and_waiting_adapters_with_the_slots_full(live: Live, made: Path) -> None:
    for name in NAMES:
        shutil.copytree(made / "one", live.adapters_dir / ".api" / name)
        admin_load(live, name)  # five adapters registered in the engine (GOVERNOR_MAX_CPU_LORAS: 32)
    held = loaded(scrape(live))
    assert all(held[n] == 1.0 for n in NAMES), held
    generating, slow, fifth = NAMES[:3], NAMES[3], NAMES[4]

    # Three adapters generate; then the fourth's request arrives with a long prompt: admitted, no token yet
    # while its prompt is prefilled (waiting), beside the three running ones.
    results: list[str] = []
    threads = [threading.Thread(target=stream, args=(live, n, 96, results)) for n in generating]
    for t in threads:
        t.start()
    views = views_until(live, lambda m: set(generating) <= m.active_models)
    long_prompt = "The lighthouse keeper counted the waves. " * 300  # ~2,400 tokens of prefill
    threads.append(threading.Thread(target=stream, args=(live, slow, 4, results, long_prompt)))
    threads[-1].start()
    views += views_until(live, lambda m: slow in m.active_models | m.waiting_models)
    # Every batch slot (GOVERNOR_MAX_LORAS) holds an adapter with a request in flight: a fifth adapter's request
    # is not refused (no 409), it waits in the engine's queue for a slot and is served.
    r = httpx.post(live.v1 + "/completions", json={"model": fifth, "prompt": "Hi", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text
    views += views_until(live, lambda m: not (m.active_models | m.waiting_models))
    for t in threads:
        t.join(120)
    assert results == ["ok"] * len(threads), results

    apart = [seen for seen, _ in views if set(generating) <= seen.active_models and slow in seen.waiting_models
             and slow not in seen.active_models]  # fmt: skip
    assert apart, "never saw the fourth adapter waiting beside three running: " + repr([v for v, _ in views][-40:])
    assert apart[0].waiting_queue_size >= 1 and apart[0].running_requests_size >= len(generating)
    for seen, text in views:
        no_version_suffix(text)
        assert seen.max_active_models == SLOTS
        assert not (seen.active_models | seen.waiting_models) - set(NAMES), seen  # only adapters in use
    idle = epp.read(scrape(live))
    assert (idle.waiting_queue_size, idle.running_requests_size) == (0, 0)
    assert 0 <= idle.kv_cache_usage_percent <= 1 and idle.cache_block_size > 0 and idle.cache_num_blocks > 0

    cards = {m["id"]: m for m in httpx.get(live.v1 + "/models", timeout=10).json()["data"]}
    assert cards[live.model]["parent"] is None
    for name, card in cards.items():
        if name != live.model:
            assert card["parent"] == live.model, card
    assert {cards[n]["tier"] for n in NAMES} == {"engine"}


def test_after_a_hot_swap_only_the_public_name_is_exported(live: Live, made: Path) -> None:
    name = SWAP
    folder = live.adapters_dir / ".api" / name
    shutil.copytree(made / "one", folder)
    admin_load(live, name)
    shutil.copy(made / "two" / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    info = admin_load(live, name)
    assert info["upstream_name"] == f"{name}@2", info
    swapped = time.monotonic()
    results: list[str] = []
    threads = [threading.Thread(target=stream, args=(live, name, 48, results))]
    views = watch(live, threads)
    assert results == ["ok"]
    assert any(name in seen.active_models | seen.waiting_models for seen, _ in views)
    for _, text in views:
        no_version_suffix(text)

    def engine_read_after_swap() -> bool:  # the engine's own series (which name `epp-swap@2`) were read
        text = scrape(live)
        age = epp.parse(text)["governor_engine_metrics_age_seconds"][0].value
        no_version_suffix(text)
        return time.monotonic() - age > swapped

    wait_for(engine_read_after_swap, 10, 0.1, what="a copy of the engine's metrics from after the swap")
    cards = {m["id"]: m for m in httpx.get(live.v1 + "/models", timeout=10).json()["data"]}
    assert cards[name]["parent"] == live.model
    assert not [m for m in cards if "@" in m]
