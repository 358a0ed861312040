"""`governor bench gateway`: the same streaming load direct to vLLM and through Governor, interleaved.

Also a relay-capacity mode against the zero-latency fake engine. Prints ratios measured in one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass

import aiohttp

from governor.bench.load import LoadResult, run_load
from governor.bench.processes import spawned
from governor.engine.process import free_port

log = logging.getLogger("governor.bench")

# ~128 tokens for the Llama/SmolLM2 tokenizers.
PROMPT = (
    "You are a careful assistant. Read the following notes and summarise them for a busy engineer. "
    "The service handles requests from many clients, each of which streams tokens back as they are "
    "generated. Operators watch latency, throughput and error rates, and they scale replicas when the "
    "queue grows. Adapters are loaded at runtime, and each one changes how the model answers. The team "
    "wants to know where time goes between the client and the engine, and whether the gateway adds "
    "measurable delay. Summary:"
)


@dataclass
class Pair:
    label: str
    direct: list[LoadResult]
    gateway: list[LoadResult]

    def ratios(self, attr: str) -> list[float]:
        return [getattr(g, attr) / getattr(d, attr) for d, g in zip(self.direct, self.gateway, strict=True)]

    def report(self, attr: str, unit: str) -> str:
        r = self.ratios(attr)
        d = statistics.median(getattr(x, attr) for x in self.direct)
        g = statistics.median(getattr(x, attr) for x in self.gateway)
        ttft = statistics.median(x.ttft_p50 for x in self.gateway) - statistics.median(x.ttft_p50 for x in self.direct)
        errors = sum(x.errors for x in self.direct + self.gateway)
        return (
            f"{self.label}: direct {d:,.1f} {unit}, gateway {g:,.1f} {unit}; ratio median {statistics.median(r):.3f} "
            f"(min {min(r):.3f}, max {max(r):.3f}, n={len(r)}); TTFT p50 delta {ttft * 1000:+.1f} ms; errors {errors}"
        )


async def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


async def interleaved(direct_url: str, gateway_url: str, body: dict[str, object], concurrency: int, total: int,
                      reps: int, label: str, gateway_extra: dict[str, object],
                      models: list[str] | None = None) -> Pair:  # fmt: skip
    """direct, gateway, gateway, direct, direct…: each repetition is a pair, and the order alternates, so
    a drift (thermal, caches, a neighbour on the machine) or going second does not favour one side.
    `models`: the same per-request model sequence on both sides (run_load)."""
    pair = Pair(label, [], [])
    warm = max(2, concurrency // 4)
    await run_load(direct_url, body, concurrency, warm, models=models)
    await run_load(gateway_url, {**body, **gateway_extra}, concurrency, warm, models=models)
    for rep in range(reps):
        for side in ("direct", "gateway") if rep % 2 == 0 else ("gateway", "direct"):
            if side == "direct":
                pair.direct.append(await run_load(direct_url, body, concurrency, total, models=models))
            else:
                pair.gateway.append(
                    await run_load(gateway_url, {**body, **gateway_extra}, concurrency, total, models=models)
                )
    return pair


async def engine_bench(gateway_url: str, engine_url: str, model: str, concurrency: int, reps: int, preset: str,
                       waves: int = 1) -> str:  # fmt: skip
    body = {"model": model, "prompt": PROMPT, "max_tokens": 128, "ignore_eos": True, "temperature": 0}
    pair = await interleaved(engine_url, gateway_url, body, concurrency, waves * concurrency, reps,
                             f"concurrency {concurrency}", {"decoding_preset": preset})  # fmt: skip
    return pair.report("tokens_per_second", "tok/s")


async def relay_bench(concurrency: int, tokens: int, reps: int, preset: str, requests: int = 0) -> list[str]:
    """Events/s through one gateway worker vs the fake engine direct, same run."""
    fake_port, gw_port = free_port(), free_port()
    fake_url, gw_url = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{gw_port}"
    env = {**os.environ, "GOVERNOR_ENGINE_URL": fake_url, "GOVERNOR_PORT": str(gw_port), "GOVERNOR_LORA": "false",
           "GOVERNOR_LOG_LEVEL": "warning", "GOVERNOR_WATCH_ADAPTERS": "false"}  # fmt: skip
    with (
        spawned([sys.executable, "-m", "governor.bench.fake_engine", str(fake_port)]),
        spawned([sys.executable, "-m", "governor", "serve"], env=env),
    ):
        await _wait_ready(fake_url + "/health", 30)
        await _wait_ready(gw_url + "/ready", 60)
        body = {"model": "fake-model", "prompt": "x", "max_tokens": tokens}
        pair = await interleaved(fake_url, gw_url, body, concurrency, requests or concurrency * 2, reps,
                                 f"relay, {concurrency} streams x {tokens} events, preset {preset}",
                                 {"decoding_preset": preset})  # fmt: skip
    return [pair.report("events_per_second", "events/s")]
