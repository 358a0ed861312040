"""`governor eval loops`: loop rate vs answer quality for decoding presets and blunt controls.

Runs the shipped prompt set (open-ended prompts that make small models loop, factual questions,
and tasks that ask for repetition) against any OpenAI-compatible URL, greedy, once per config.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import aiohttp

from governor.stream.loop_detector import has_repeated_block

# Blunt single controls the presets are measured against, each on top of preset `off`.
CONFIGS: dict[str, dict[str, Any]] = {
    "off": {"decoding_preset": "off"},
    "balanced": {"decoding_preset": "balanced"},
    "strict": {"decoding_preset": "strict"},
    "repetition_penalty=1.1": {"decoding_preset": "off", "repetition_penalty": 1.1},
    "repetition_penalty=1.2": {"decoding_preset": "off", "repetition_penalty": 1.2},
    "frequency_penalty=0.5": {"decoding_preset": "off", "frequency_penalty": 0.5},
    "vllm repetition_detection": {
        "decoding_preset": "off",
        "repetition_detection": {"max_pattern_size": 32, "min_pattern_size": 1, "min_count": 3},
    },
}
DEFAULT_CONFIGS = list(CONFIGS)


def config_fields(name: str) -> dict[str, Any]:
    """A named config, or `preset+field=value+…` (values as JSON) for trying variants without a restart."""
    if name in CONFIGS:
        return CONFIGS[name]
    preset, *overrides = name.split("+")
    fields: dict[str, Any] = {"decoding_preset": preset}
    for item in overrides:
        key, _, value = item.partition("=")
        fields[key] = json.loads(value)
    return fields


def load_prompts(limit_per_kind: int | None = None) -> list[dict[str, Any]]:
    text = resources.files("governor.eval").joinpath("prompts.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if limit_per_kind is None:
        return rows
    out: list[dict[str, Any]] = []
    for kind in ("open", "factual", "repeat"):
        out.extend([r for r in rows if r["kind"] == kind][:limit_per_kind])
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _dedup(words: list[str]) -> list[str]:
    """Collapse immediate repeats: "1. 1\n2. 2" counts 1, 2 just like "1, 2"."""
    return [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]


def _contiguous(needle: list[str], hay: list[str]) -> bool:
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def passes(check: dict[str, Any], text: str) -> bool:
    """Whether an answer satisfies its prompt's check."""
    low = text.lower()
    kind = check["type"]
    if kind == "any":
        return any(v in low for v in check["values"])
    if kind == "sequence":
        return _contiguous([v.lower() for v in check["values"]], _dedup(_words(text)))
    if kind == "spell":
        letters = [w for w in re.split(r"[^a-z]+", low) if len(w) == 1]
        return _contiguous(list(check["word"]), letters) or _contiguous(_dedup(list(check["word"])), _dedup(letters))
    if kind == "count":
        return low.count(check["value"].lower()) >= int(check["min"])
    raise ValueError(f"unknown check type {kind!r}")


@dataclass
class Answer:
    prompt: dict[str, Any]
    text: str = ""
    finish: str | None = None
    stop_reason: Any = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Score:
    config: str
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0

    def _share(self, predicate: Any, kind: str | None = None) -> float:
        pool = [a for a in self.answers if kind is None or a.prompt["kind"] == kind]
        return sum(1 for a in pool if predicate(a)) / len(pool) if pool else float("nan")

    @property
    def loop_rate(self) -> float:
        """Share of answers to prompts that do not ask for repetition whose text still holds a block
        repeated 3+ times in a row (on prompts that ask for it, repeating is the right answer)."""
        pool = [a for a in self.answers if a.prompt["kind"] != "repeat"]
        return sum(1 for a in pool if has_repeated_block(a.text)) / len(pool) if pool else float("nan")

    @property
    def length_stops(self) -> float:
        return self._share(lambda a: a.finish == "length")

    @property
    def factual(self) -> float:
        return self._share(lambda a: passes(a.prompt["check"], a.text), "factual")

    @property
    def repetition(self) -> float:
        return self._share(lambda a: passes(a.prompt["check"], a.text), "repeat")

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.answers)

    @property
    def errors(self) -> int:
        return sum(1 for a in self.answers if a.error)


async def _ask(session: aiohttp.ClientSession, url: str, model: str, prompt: dict[str, Any], extra: dict[str, Any],
               max_tokens: int, headers: dict[str, str]) -> Answer:  # fmt: skip
    body = {"model": model, "messages": [{"role": "user", "content": prompt["prompt"]}], "max_tokens": max_tokens,
            "temperature": 0, "seed": 0, **extra}  # fmt: skip
    answer = Answer(prompt)
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                answer.error = f"{resp.status}: {data}"
                return answer
    except (aiohttp.ClientError, TimeoutError) as exc:
        answer.error = repr(exc)
        return answer
    choice = data["choices"][0]
    answer.text = choice["message"].get("content") or ""
    answer.finish, answer.stop_reason = choice.get("finish_reason"), choice.get("stop_reason")
    answer.tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    return answer


async def run_eval(url: str, model: str, configs: list[str], prompts: list[dict[str, Any]], max_tokens: int = 256,
                   concurrency: int = 16, api_key: str = "") -> list[Score]:  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    scores = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for name in configs:
            extra = config_fields(name)
            gate = asyncio.Semaphore(concurrency)

            async def one(p: dict[str, Any], extra: dict[str, Any] = extra, gate: asyncio.Semaphore = gate) -> Answer:
                async with gate:
                    return await _ask(session, url.rstrip("/"), model, p, extra, max_tokens, headers)

            start = time.perf_counter()
            answers = await asyncio.gather(*(one(p) for p in prompts))
            scores.append(Score(name, list(answers), time.perf_counter() - start))
    return scores


def table(scores: list[Score]) -> str:
    head = ("| config | loop rate | length stops | factual acc. | repetition acc. | tokens | tok/s | errors |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    rows = [
        f"| {s.config} | {s.loop_rate:.1%} | {s.length_stops:.1%} | {s.factual:.1%} | {s.repetition:.1%} | "
        f"{s.tokens} | {s.tokens / s.seconds if s.seconds else 0:.0f} | {s.errors} |"
        for s in scores
    ]
    return "\n".join([head, *rows])


def loops_detail(score: Score) -> list[str]:
    """The prompts whose answers still loop, for tuning."""
    return [a.prompt["id"] for a in score.answers if a.prompt["kind"] != "repeat" and has_repeated_block(a.text)]
