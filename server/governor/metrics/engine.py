"""Re-exports each engine's `vllm:*` metrics with an `engine` label.

Text-level rewrite rather than parse-and-render: a vLLM scrape is tens of KB of histograms, and the
prometheus_client parser is pure Python; label injection on lines keeps a scrape in the low ms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from governor.engine.base import EngineClient


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


async def scrape(engines: Sequence[EngineClient]) -> str:
    texts = await asyncio.gather(*(e.metrics_text() for e in engines))
    return merge([(e.name, t) for e, t in zip(engines, texts, strict=True)])
