"""A small streaming load generator: fixed concurrency, exact counts, per-request TTFT."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass
class LoadResult:
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    events: int = 0
    output_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # between a stream's successive reads after the first

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttfts) if self.ttfts else float("nan")

    @property
    def gap_p50(self) -> float:
        """Inter-token p50 as a client sees it: the median time between a stream's reads."""
        return statistics.median(self.gaps) if self.gaps else float("nan")

    @property
    def ttft_p99(self) -> float:
        return statistics.quantiles(self.ttfts, n=100)[98] if len(self.ttfts) > 1 else float("nan")


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
               result: LoadResult) -> None:  # fmt: skip
    start = time.perf_counter()
    first: float | None = None
    last = 0.0
    tail = b""
    gaps: list[float] = []
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                result.errors += 1
                return
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                result.events += chunk.count(b"\n\n")
                tail = (tail + chunk)[-4096:]
    except (aiohttp.ClientError, OSError):
        result.errors += 1
        return
    if b"[DONE]" not in tail or b'"error"' in tail:
        result.errors += 1
        return
    result.requests += 1
    result.gaps += gaps
    if first is not None:
        result.ttfts.append(first - start)
    # The usage chunk is the last event before [DONE].
    events = tail.split(b"data: ")
    for ev in reversed(events):
        if b'"usage"' in ev and b'"choices":[]' in ev:
            result.output_tokens += int(orjson.loads(ev.strip())["usage"]["completion_tokens"])
            break


async def run_load(
    base_url: str, body: dict[str, Any], concurrency: int, total: int, headers: dict[str, str] | None = None,
    path: str = "/v1/completions", models: list[str] | None = None,
) -> LoadResult:  # fmt: skip
    """Send `total` streaming requests, `concurrency` at a time; count output tokens from usage chunks.
    `models`: request i names models[i % len(models)] (an adapter mix) instead of the body's model."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    raws = [orjson.dumps({**body, "model": m}) for m in models] if models else [orjson.dumps(body)]
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    result = LoadResult()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await _one(session, base_url.rstrip("/") + path, raws[i % len(raws)], hdrs, result)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result
