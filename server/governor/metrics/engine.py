"""Re-exports each engine's `vllm:*` metrics with an `engine` label.

Text-level rewrite rather than parse-and-render: a vLLM scrape is tens of KB of histograms, and the
prometheus_client parser is pure Python; one pass over the lines takes ~0.5 ms for vLLM's ~40 KB.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping, Sequence

from governor.engine.base import EngineClient
from governor.metrics.families import Families
from governor.metrics.model_server import RENAMED, REPLACED, EngineCache, ModelServerSeries

# How often each engine's /metrics is fetched while Governor is being scraped.
ENGINE_REFRESH_SECONDS = 1.0


_FAMILY = "\n# HELP "
_COMMENT = re.compile(r"\n#[^\n]*")


def _relabel(text: str, engine: str) -> str:
    """Every vllm:* sample gets ``engine="<engine>"``; vLLM's own `engine` label (its data-parallel
    index) becomes `vllm_engine`; `_created` samples go: prometheus_client's creation timestamps,
    which the gateway disables for itself (app.py) and no dashboard reads. A sample with `@` in it goes:
    after a hot-swap the engine knows an adapter as `name@2`, a name no client can ask for, and no label
    value Governor exports carries one. Other families are dropped later, so their lines are left alone.
    ~1 µs a line (a regex sub with a template was 3x that)."""
    text = text.replace('{engine="', '{vllm_engine="').replace(',engine="', ',vllm_engine="')
    label = f'engine="{engine}"'
    first, only = "{" + label + ",", "{" + label + "}"
    out = []
    for line in text.split("\n"):
        if line[:5] == "vllm:":
            space = line.find(" ")
            if space < 0:
                continue  # no value: not a sample
            name_end = line.find("{", 0, space)
            if name_end < 0:
                name_end = space
            if line[name_end - 8 : name_end] == "_created" or "@" in line:
                continue
            if name_end == space:
                line = line[:space] + only + line[space:]
            elif line[name_end + 1] == "}":
                line = line[:name_end] + only + line[name_end + 2 :]
            else:
                line = line[:name_end] + first + line[name_end + 1 :]
        out.append(line)
    return "\n".join(out)


def merge(
    texts: Sequence[tuple[str, str | None]], drop: frozenset[str] = frozenset(), rename: Mapping[str, str] | None = None
) -> str:
    """Combine (engine name, metrics text) pairs into one exposition; samples of a family stay together.
    Families named in `drop` are left out (Governor exports its own of those names), or renamed when
    `rename` names them."""
    rename = rename or {}
    merged: dict[str, list[str]] = {}
    for engine, text in texts:
        if not text:
            continue
        blocks = ("\n" + _relabel(text.rstrip("\n"), engine)).split(_FAMILY)
        for block in blocks[1:]:  # what precedes the first HELP belongs to no family
            name = block.split(" ", 1)[0]
            if not name.startswith("vllm:") or name.endswith("_created"):
                continue  # process/python metrics of the engine would collide with the gateway's own
            if name in drop:
                if name not in rename:
                    continue
                block = block.replace(name, rename[name])  # its HELP, TYPE and sample lines
                name = rename[name]
            target = merged.get(name)
            if target is None:
                merged[name] = [_FAMILY, block]
            else:  # another engine's (or a repeated) family: its samples only
                target.append(_COMMENT.sub("", "\n" + block.partition("\n")[2]))
    return "".join(part for parts in merged.values() for part in parts)[1:] + "\n" if merged else ""


class EngineScraper:
    """Keeps a recent copy of each engine's /metrics, so that Governor's scrape never waits for one.

    vLLM renders its /metrics in ~10 ms idle and later when busy (its API server is streaming tokens);
    a slow engine must not make Governor's /metrics slow. While Governor is being scraped, a
    background task refreshes every engine's copy each ``refresh`` seconds (one /metrics request per
    engine per period, whatever the number of scrapers), and a scrape only merges the copies. The task
    stops after ``idle_stop`` seconds without a scrape; the scrape that starts it (the first, or the
    first after a long idle) waits for fresh copies. ``governor_engine_metrics_age_seconds`` says how
    old each engine's copy is; an engine whose fetch fails has no copy (its series go, and
    ``governor_engine_up`` says why). With a `model_server`, its families replace the engine's of the
    same names (see metrics/model_server.py) and are rendered at every scrape from Governor's state.
    """

    def __init__(
        self,
        refresh: float = ENGINE_REFRESH_SECONDS,
        idle_stop: float = 300.0,
        model_server: ModelServerSeries | None = None,
    ) -> None:
        self.refresh = refresh
        self.idle_stop = idle_stop
        self._engines: Sequence[EngineClient] = ()
        self._copies: dict[str, tuple[float, str]] = {}  # engine -> (fetched at, text)
        self._caches: dict[str, EngineCache] = {}  # engine -> KV cache state parsed from its copy
        self.model_server = model_server
        self._drop = REPLACED if model_server is not None else frozenset()
        self._merged: str | None = None  # merge of the current copies
        self._task: asyncio.Task[None] | None = None
        self._fetched = asyncio.Event()  # set once the running poller's first fetch is done
        self._last_scrape = 0.0
        self._families = Families()
        self._age = self._families.gauge(
            "governor_engine_metrics_age_seconds",
            "Age of each engine's vllm:* metrics in this scrape (refreshed in the background while scraped).",
            ("engine",),
        )

    async def _fetch_all(self) -> None:
        engines = list(self._engines)
        texts = await asyncio.gather(*(engine.metrics_text() for engine in engines))
        now = time.monotonic()
        for engine, text in zip(engines, texts, strict=True):
            if text is None:
                self._copies.pop(engine.name, None)
                self._caches.pop(engine.name, None)
            else:
                self._copies[engine.name] = (now, text)
                if self.model_server is not None:
                    self._caches[engine.name] = EngineCache.parse(text)
        self._merged = None

    async def _poll(self, fetched: asyncio.Event) -> None:
        try:
            while True:
                await self._fetch_all()
                fetched.set()
                if time.monotonic() - self._last_scrape >= self.idle_stop:
                    return
                await asyncio.sleep(self.refresh)
        finally:
            fetched.set()  # a failed fetch must not leave a scrape waiting
            self._task = None

    async def scrape(self, engines: Sequence[EngineClient]) -> str:
        self._last_scrape = time.monotonic()
        self._engines = engines
        if self._task is None:  # one poller, however many scrapes arrive while it starts
            self._fetched = asyncio.Event()
            self._task = asyncio.ensure_future(self._poll(self._fetched))
        await self._fetched.wait()
        if self._merged is None:
            self._merged = merge(
                [(e.name, self._copies[e.name][1] if e.name in self._copies else None) for e in engines],
                self._drop,
                RENAMED,
            )
        now = time.monotonic()
        for engine in engines:
            copy = self._copies.get(engine.name)
            if copy is None:
                self._age.remove(engine.name)
            else:
                self._age.labels(engine.name).set(now - copy[0])
        out = self._merged + self._families.render().decode()
        if self.model_server is not None:
            names = [e.name for e in engines]
            out += self.model_server.render(names, [self._caches.get(name) for name in names])
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
