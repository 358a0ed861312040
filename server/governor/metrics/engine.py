"""Re-exports each engine's `vllm:*` metrics with an `engine` label.

Text-level rewrite rather than parse-and-render: a vLLM scrape is tens of KB of histograms, and the
prometheus_client parser is pure Python; label injection on lines keeps a scrape in the low ms.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from governor.engine.base import EngineClient
from governor.metrics.families import Families

# How long a scrape waits for an engine's fresh metrics before it uses the previous copy.
ENGINE_WAIT_SECONDS = 0.01


def _label_line(line: str, label: str) -> str:
    # vLLM labels samples with its own `engine` (data-parallel index); keep it as `vllm_engine`.
    line = line.replace('{engine="', '{vllm_engine="', 1).replace(',engine="', ',vllm_engine="', 1)
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        return line[: brace + 1] + label + ("," if line[brace + 1] != "}" else "") + line[brace + 1 :]
    return line[:space] + "{" + label + "}" + line[space:]


def _is_created(line: str) -> bool:
    """A `<name>_created` sample: the creation timestamp prometheus_client adds to counters and histograms."""
    return line.split("{", 1)[0].split(" ", 1)[0].endswith("_created")


def _families(text: str, engine: str) -> dict[str, list[str]]:
    """Lines grouped by family (a `# HELP` starts one), samples relabelled."""
    label = f'engine="{engine}"'
    families: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split(" ", 3)[2]
            current = families.get(name)
            if current is None:
                current = families[name] = []
            if not any(existing.startswith(line[:7]) for existing in current if existing.startswith("#")):
                current.append(line)
            continue
        if line.startswith("#") or current is None:
            continue
        if "_created" in line and _is_created(line):
            continue  # vLLM keeps them; the gateway disables its own (app.py): no dashboard reads them
        current.append(_label_line(line, label))
    return families


def merge(texts: Sequence[tuple[str, str | None]]) -> str:
    """Combine (engine name, metrics text) pairs into one exposition; samples of a family stay together."""
    merged: dict[str, list[str]] = {}
    for engine, text in texts:
        if not text:
            continue
        for name, lines in _families(text, engine).items():
            if not name.startswith("vllm:"):
                continue  # process/python metrics of the engine would collide with the gateway's own
            target = merged.setdefault(name, [])
            if target:
                lines = [ln for ln in lines if not ln.startswith("#")]
            target.extend(lines)
    return "".join(line + "\n" for lines in merged.values() for line in lines)


class EngineScraper:
    """Fetches the engines' /metrics for a gateway scrape within a time budget.

    A busy engine answers its /metrics late (its API server is streaming tokens), and a slow engine
    must not make Governor's /metrics slow. A scrape waits at most ``wait`` seconds for fresh text
    from an engine it has a copy of; an engine that has not answered by then contributes that last
    copy, and its fetch goes on in the background to refresh it for the next scrape (never two at
    once). ``governor_engine_metrics_age_seconds`` says how old each engine's copy was.
    """

    def __init__(self, wait: float = ENGINE_WAIT_SECONDS) -> None:
        self.wait = wait
        self._copies: dict[str, tuple[float, str]] = {}  # engine -> (fetched at, text)
        self._fetches: dict[str, asyncio.Task[None]] = {}
        self._families = Families()
        self._age = self._families.gauge(
            "governor_engine_metrics_age_seconds",
            "Age of each engine's vllm:* metrics in this scrape (a slow engine's last copy is served).",
            ("engine",),
        )

    async def _fetch(self, engine: EngineClient) -> None:
        try:
            text = await engine.metrics_text()
        finally:
            del self._fetches[engine.name]
        if text is None:
            self._copies.pop(engine.name, None)  # down: its series go, governor_engine_up says why
        else:
            self._copies[engine.name] = (time.monotonic(), text)

    async def scrape(self, engines: Sequence[EngineClient]) -> str:
        for engine in engines:
            if engine.name not in self._fetches:
                self._fetches[engine.name] = asyncio.ensure_future(self._fetch(engine))
        running = [self._fetches[e.name] for e in engines if e.name in self._fetches]
        if running:
            # without a copy to fall back on, wait for the fetch itself (it has its own timeout)
            first = any(e.name not in self._copies for e in engines)
            await asyncio.wait(running, timeout=None if first else self.wait)
        now = time.monotonic()
        texts: list[tuple[str, str | None]] = []
        for engine in engines:
            copy = self._copies.get(engine.name)
            texts.append((engine.name, copy[1] if copy else None))
            if copy is None:
                self._age.remove(engine.name)
            else:
                self._age.labels(engine.name).set(now - copy[0])
        return merge(texts) + self._families.render().decode()
