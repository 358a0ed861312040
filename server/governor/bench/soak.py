"""`governor bench soak`: many concurrent streaming clients for a bounded time.

Every stream must end with [DONE] (or an error event, counted), no response may be a 5xx, and the
gateway's RSS at the end must stay within 10% of its RSS after the first minute (leak check).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp
import psutil


def listening_pid(url: str) -> int | None:
    """The process listening on the URL's port (the gateway), for RSS readings."""
    port = urlparse(url).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


@dataclass
class SoakResult:
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    rss_first_minute: float | None = None
    rss_end: float | None = None
    seconds: float = 0.0

    @property
    def streams(self) -> int:
        return sum(self.outcomes.values())

    def summary(self) -> str:
        rss = ""
        if self.rss_first_minute and self.rss_end:
            growth = self.rss_end / self.rss_first_minute - 1
            rss = (f"; gateway RSS after first minute {self.rss_first_minute / 2**20:.0f} MiB, "
                   f"at end {self.rss_end / 2**20:.0f} MiB ({growth:+.1%})")  # fmt: skip
        return (f"{self.streams} streams in {self.seconds:.0f} s: {dict(self.outcomes)}; "
                f"HTTP statuses {dict(self.statuses)}{rss}")  # fmt: skip


async def _client(session: aiohttp.ClientSession, url: str, body: dict[str, object], stop_at: float,
                  result: SoakResult) -> None:  # fmt: skip
    while time.monotonic() < stop_at:
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                result.statuses[resp.status] += 1
                if resp.status != 200:
                    await resp.read()
                    result.outcomes["refused" if resp.status < 500 else "server_error"] += 1
                    await asyncio.sleep(0.5)
                    continue
                tail = b""
                async for chunk in resp.content.iter_any():
                    tail = (tail + chunk)[-2048:]
            if not tail.rstrip().endswith(b"data: [DONE]"):
                result.outcomes["truncated"] += 1
            elif b'"error"' in tail:
                result.outcomes["error_event"] += 1
            else:
                result.outcomes["done"] += 1
        except (aiohttp.ClientError, OSError):
            result.outcomes["transport_error"] += 1


async def soak(url: str, model: str, clients: int, seconds: float, max_tokens: int = 16,
               api_key: str = "") -> SoakResult:  # fmt: skip
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": max_tokens, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = SoakResult()
    proc = psutil.Process(pid) if (pid := listening_pid(url)) else None
    start = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:  # fmt: skip

        async def sample_rss() -> None:
            await asyncio.sleep(min(60.0, seconds / 2))
            if proc is not None:
                result.rss_first_minute = float(proc.memory_info().rss)

        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(_client(session, url, body, start + seconds, result) for _ in range(clients)))
        await sampler
    result.seconds = time.monotonic() - start
    if proc is not None:
        result.rss_end = float(proc.memory_info().rss)
    return result
