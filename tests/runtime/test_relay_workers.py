"""Relay workers (GOVERNOR_RELAY_WORKERS=2): the real `governor serve` (remote mode) in front of the fake
engine, both as processes, over real HTTP. Every test opens each request on a fresh connection, so the
kernel's SO_REUSEPORT spreads them over the owner and the worker, and checks what the owner counts: the
decisions (quotas, the engines' admission) are the owner's alone, so they stay exact across processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from governor.engine.process import free_port
from governor.runtime.relay_workers import RESTART_DELAY_MAX, RESTART_DELAY_MIN, STABLE_RUN, restart_delay
from tests.conftest import Live, start_governor, wait_for
from tests.lora.factory import BASE_DIR, AdapterFactory, require_base

KEYS = ("key-a", "key-b", "key-c")
KEY_CONCURRENCY = 3
IN_FLIGHT = 5  # the engine's budget: max_running 4 + max_queued 1
TOKEN_DELAY = 0.05  # the fake engine's time per token: a 40-token stream lasts ~2 s


@contextlib.contextmanager
def fake_engine() -> Iterator[int]:
    """The fake engine as a process of its own, on a free port (yielded); stopped with SIGTERM, since a job
    started in the background (CI) hands its children SIGINT ignored."""
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "governor.bench.fake_engine", str(port), str(TOKEN_DELAY)])
    try:
        yield port
    finally:
        fake.terminate()
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
            fake.wait(10)


@pytest.fixture(scope="module")
def relayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with fake_engine() as port:
        env = {
            "GOVERNOR_ENGINE_URL": f"http://127.0.0.1:{port}", "GOVERNOR_RELAY_WORKERS": "2",
            "GOVERNOR_API_KEYS": ",".join(KEYS), "GOVERNOR_KEY_CONCURRENCY": str(KEY_CONCURRENCY),
            "GOVERNOR_MAX_RUNNING": "4", "GOVERNOR_MAX_QUEUED": "1", "GOVERNOR_ADDRESS_CONCURRENCY": "256",
        }  # fmt: skip
        with start_governor(tmp_path_factory.mktemp("relayed"), **env) as server:
            yield server


def workers_of(owner: int) -> list[int]:
    """The owner's child processes: its relay workers (a remote engine runs elsewhere)."""
    children: list[int] = []
    for task in Path(f"/proc/{owner}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def metric(live: Live, name: str, labels: str = "") -> float:
    text = httpx.get(live.url + "/metrics", headers=auth(KEYS[0]), timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)", line)
        if match and labels in (match.group(1) or ""):
            total += float(match.group(2))
    return total


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Connection": "close"}


def stream_body(tokens: int) -> dict[str, object]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


async def one_stream(live: Live, key: str, tokens: int) -> tuple[int, bytes]:
    """A stream on a connection of its own: (status, everything received)."""
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", live.v1 + "/chat/completions", json=stream_body(tokens), headers=auth(key)) as resp,
    ):
        return resp.status_code, await resp.aread()


def settle(live: Live) -> None:
    wait_for(lambda: metric(live, "governor_requests_in_flight") == 0, 20, what="no request in flight")


def test_connections_spread_over_both_processes(relayed: Live) -> None:
    settle(relayed)
    before = [metric(relayed, "governor_relayed_requests_total", f'worker="{w}"') for w in (0, 1)]
    for _ in range(40):
        resp = httpx.post(relayed.v1 + "/completions", headers=auth(KEYS[0]), timeout=30,
                          json={"model": "fake-model", "prompt": "hi", "max_tokens": 2})  # fmt: skip
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 2
    after = [metric(relayed, "governor_relayed_requests_total", f'worker="{w}"') for w in (0, 1)]
    served = [a - b for a, b in zip(after, before, strict=True)]
    print("requests relayed by the owner and the worker:", served)
    assert sum(served) == 40
    assert min(served) >= 8  # 40 fresh connections hashed over two listeners: 20 +- 3 each, 8 is ~4 sigma


def test_streams_through_a_worker_end_as_through_the_owner(relayed: Live) -> None:
    async def run() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(one_stream(relayed, KEYS[i % 3], 6) for i in range(IN_FLIGHT)))

    settle(relayed)
    for status, raw in asyncio.run(run()):
        assert status == 200
        events = [line for line in raw.decode().split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        assert '"usage":{"prompt_tokens"' in events[-2] and '"completion_tokens":6' in events[-2]
    settle(relayed)


def test_admission_and_key_quotas_are_exact_across_processes(relayed: Live) -> None:
    """12 concurrent streams, 4 per key: each key may run 3 (9 pass the quota), the engine takes 5 in all."""

    async def run() -> list[int]:
        results = await asyncio.gather(*(one_stream(relayed, key, 40) for key in KEYS for _ in range(4)))
        return [status for status, _ in results]

    settle(relayed)
    before = sum(metric(relayed, "governor_relayed_requests_total", f'worker="{w}"') for w in (0, 1))
    statuses = asyncio.run(run())
    print("statuses:", sorted(statuses))
    assert statuses.count(200) == IN_FLIGHT
    assert statuses.count(429) == 12 - IN_FLIGHT
    assert sum(metric(relayed, "governor_relayed_requests_total", f'worker="{w}"') for w in (0, 1)) - before == 5
    settle(relayed)
    # Everything was given back: the same burst is admitted the same way again.
    assert asyncio.run(run()).count(200) == IN_FLIGHT
    settle(relayed)


def test_a_killed_worker_gives_back_what_it_held_and_is_restarted(relayed: Live) -> None:
    settle(relayed)
    (worker,) = workers_of(relayed.proc.pid)

    def on_worker() -> float:
        return metric(relayed, "governor_relayed_requests_total", 'worker="1"')

    async def run() -> list[int]:
        for _ in range(4):  # five fresh connections all on the owner: 1 in 32; then again
            base, tasks = on_worker(), []
            for key in (*KEYS, KEYS[0], KEYS[0]):  # the engine's five, the keys' quotas allowing
                tasks.append(asyncio.ensure_future(one_stream(relayed, key, 120)))
                await asyncio.sleep(0.4)
            if on_worker() > base:
                break
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(settle, relayed)
        os.kill(worker, signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return [r[0] if isinstance(r, tuple) else 0 for r in results]

    outcomes = asyncio.run(run())
    print("outcomes (0: connection lost with the worker):", outcomes)
    assert outcomes.count(0) >= 1  # some streams were the worker's (five fresh connections, two listeners)
    settle(relayed)  # the owner released the lost streams' leases, quota and in-flight count
    wait_for(lambda: len(workers_of(relayed.proc.pid)) == 1 and workers_of(relayed.proc.pid)[0] != worker, 15,
             what="the worker restarted")  # fmt: skip
    assert "relay worker 1 exited" in relayed.log_tail()

    async def burst() -> list[int]:
        return [s for s, _ in await asyncio.gather(*(one_stream(relayed, KEYS[0], 4) for _ in range(3)))]

    assert asyncio.run(burst()) == [200, 200, 200]  # key-a's three slots are free again


def test_restart_delays_double_while_a_worker_keeps_failing_and_reset_after_a_stable_run() -> None:
    delays = [restart_delay(None, 0.2)]
    for _ in range(6):
        delays.append(restart_delay(delays[-1], 1.0))  # it died a second after each start
    assert delays == [RESTART_DELAY_MIN, 1.0, 2.0, 4.0, 8.0, RESTART_DELAY_MAX, RESTART_DELAY_MAX]
    assert restart_delay(RESTART_DELAY_MAX, STABLE_RUN) == RESTART_DELAY_MIN  # it had served a while


def test_other_routes_are_the_owners(relayed: Live) -> None:
    for _ in range(10):
        models = httpx.get(relayed.v1 + "/models", headers=auth(KEYS[1]), timeout=10)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "fake-model"
        assert httpx.get(relayed.url + "/ready", headers={"Connection": "close"}, timeout=10).status_code == 200
        refused = httpx.get(relayed.v1 + "/models", headers=auth("wrong"), timeout=10)
        assert refused.status_code == 401 and refused.json()["error"]["type"]
        # The owner's private routes do not exist for a caller without the workers' token.
        internal = httpx.post(relayed.url + "/internal/relay/plan/chat", json=stream_body(2), headers=auth(KEYS[1]),
                              timeout=10)  # fmt: skip
        assert internal.status_code == 404


def test_bad_requests_get_the_owners_errors_through_a_worker(relayed: Live) -> None:
    for _ in range(10):
        bad = httpx.post(relayed.v1 + "/chat/completions", content=b"{nope", headers=auth(KEYS[2]), timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        no_key = httpx.post(relayed.v1 + "/chat/completions", json=stream_body(2), headers={"Connection": "close"},
                            timeout=10)  # fmt: skip
        assert no_key.status_code == 401


@pytest.fixture(scope="module")
def relayed_adapters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Two processes, one adapter slot in the batch (MAX_LORAS=1), two real PEFT adapters on disk."""
    require_base()
    golden = AdapterFactory(tmp_path_factory.mktemp("golden"))
    root = tmp_path_factory.mktemp("relayed-adapters")
    (root / "adapters").mkdir()
    for name in ("ada", "adb"):
        golden.copy("good", root / "adapters" / name)
    with fake_engine() as port:
        env = {
            "GOVERNOR_ENGINE_URL": f"http://127.0.0.1:{port}", "GOVERNOR_RELAY_WORKERS": "2",
            "GOVERNOR_MODEL": str(BASE_DIR), "GOVERNOR_SERVED_MODEL_NAME": "fake-model",
            "GOVERNOR_STAGING_DIR": str(root / "staging"), "GOVERNOR_MAX_LORAS": "1", "GOVERNOR_MAX_CPU_LORAS": "1",
            "GOVERNOR_MAX_LORA_RANK": "16", "GOVERNOR_ADDRESS_CONCURRENCY": "256",
        }  # fmt: skip
        with start_governor(root, **env) as server:
            wait_for(lambda: len(httpx.get(server.v1 + "/models", timeout=10).json()["data"]) == 3, 60,
                     what="both adapters registered")  # fmt: skip
            yield server


def test_adapter_leases_are_exact_across_processes(relayed_adapters: Live) -> None:
    """Three streams on `ada` hold the one batch slot, through both processes; `adb` waits for all three to
    end (never a 409), however the five connections were spread."""
    live = relayed_adapters

    async def stream(model: str, tokens: int) -> tuple[int, float]:
        body = {**stream_body(tokens), "model": model}
        async with (
            httpx.AsyncClient(timeout=60) as client,
            client.stream("POST", live.v1 + "/chat/completions", json=body, headers={"Connection": "close"}) as r,
        ):
            await r.aread()
            return r.status_code, time.monotonic()

    async def run() -> tuple[list[tuple[int, float]], tuple[int, float]]:
        holders = [asyncio.ensure_future(stream("ada", 40)) for _ in range(3)]
        await asyncio.sleep(0.5)
        waiter = await stream("adb", 2)
        return await asyncio.gather(*holders), waiter

    for _ in range(2):  # the second round starts with `adb` in the slot: `ada` waits for it, then holds it
        holders, (status, ended) = asyncio.run(run())
        assert [s for s, _ in holders] == [200, 200, 200]
        assert status == 200
        assert ended >= max(t for _, t in holders)  # it waited for the last `ada` stream to end
    settle(live)


def test_clients_that_leave_while_waiting_for_the_adapter_slot_hold_nothing(relayed_adapters: Live) -> None:
    """`adb` callers give up while `ada` holds the one slot (on both processes): their waits end with them,
    nothing stays in flight, and the next `adb` is served as soon as the slot frees."""
    live = relayed_adapters
    settle(live)

    async def stream(model: str, tokens: int, timeout: float) -> int:
        body = {**stream_body(tokens), "model": model}
        async with httpx.AsyncClient(timeout=timeout) as client:
            try:
                async with client.stream("POST", live.v1 + "/chat/completions", json=body,
                                         headers={"Connection": "close"}) as resp:  # fmt: skip
                    await resp.aread()
                    return resp.status_code
            except httpx.TimeoutException:
                return 0

    async def run() -> tuple[list[int], list[int]]:
        holders = [asyncio.ensure_future(stream("ada", 60, 60)) for _ in range(3)]  # ~3 s each
        await asyncio.sleep(1.0)
        leavers = await asyncio.gather(*(stream("adb", 2, 0.5 + 0.1 * i) for i in range(6)))
        return await asyncio.gather(*holders), leavers

    holders, leavers = asyncio.run(run())
    assert holders == [200, 200, 200] and leavers == [0] * 6
    settle(live)  # nothing the leavers started is still counted
    assert asyncio.run(stream("adb", 2, 30)) == 200
    settle(live)
