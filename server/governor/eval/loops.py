"""`governor eval loops`: loop rate vs answer quality for decoding presets and blunt controls.

Runs the shipped prompt set (eval/prompts.jsonl: stories and poems, lists, recipes, code, JSON and
tables, multi-turn chat, long answers, facts with checkable answers, tasks that ask for repetition)
against any OpenAI-compatible URL, greedy and sampled, and judges loops with :mod:`governor.eval.judge`
(not with the gateway's own loop cut). A quarter of the set is marked ``split: "holdout"``: it was
fixed before the presets were tuned on the rest and is reported on its own.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import aiohttp

from governor.eval.judge import judge

# Blunt single controls the presets are measured against, each on top of preset `off`.
CONFIGS: dict[str, dict[str, Any]] = {
    "off": {"decoding_preset": "off"},
    "balanced": {"decoding_preset": "balanced"},
    "strict": {"decoding_preset": "strict"},
    "repetition_penalty=1.1": {"decoding_preset": "off", "repetition_penalty": 1.1},
    "repetition_penalty=1.2": {"decoding_preset": "off", "repetition_penalty": 1.2},
    "frequency_penalty=0.5": {"decoding_preset": "off", "frequency_penalty": 0.5},
    "repetition_detection": {
        "decoding_preset": "off",
        "repetition_detection": {"max_pattern_size": 32, "min_count": 3},
    },
}
DEFAULT_CONFIGS = list(CONFIGS)
CATEGORIES = ("story", "list", "recipe", "code", "data", "chat", "long", "fact", "repeat")
CHECKED = ("fact", "repeat")  # categories scored by their checks; the rest by the loop judge


def config_fields(name: str) -> dict[str, Any]:
    """A named config, or `preset+field=value+…` for trying variants without a restart: a value is read as
    JSON (1.15, true, [1, 2]) and otherwise taken as a string (dry_scope=output)."""
    if name in CONFIGS:
        return CONFIGS[name]
    preset, *overrides = name.split("+")
    fields: dict[str, Any] = {"decoding_preset": preset}
    for item in overrides:
        key, equals, value = item.partition("=")
        if not key or not equals:
            raise ValueError(f"config {name!r}: {item!r} is not field=value")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return fields


def load_prompts(
    split: str = "all", categories: Iterable[str] = (), limit_per_category: int = 0
) -> list[dict[str, Any]]:
    """The shipped prompts, filtered by split ("all", "tune", "holdout") and categories."""
    text = resources.files("governor.eval").joinpath("prompts.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    wanted = set(categories) or set(CATEGORIES)
    rows = [r for r in rows if r["category"] in wanted and split in ("all", r["split"])]
    if limit_per_category:
        rows = [r for c in CATEGORIES for r in [x for x in rows if x["category"] == c][:limit_per_category]]
    return rows


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
    if kind == "word":  # whole words: "au" must not match "because"
        return any(re.search(rf"(?<![a-z0-9]){re.escape(v)}(?![a-z0-9])", low) for v in check["values"])
    if kind == "all":  # each value, with "a|b" alternatives
        return all(any(alt in low for alt in v.split("|")) for v in check["values"])
    if kind == "sequence":
        return _contiguous([v.lower() for v in check["values"]], _dedup(_words(text)))
    if kind == "spell":
        letters = [w for w in re.split(r"[^a-z]+", low) if len(w) == 1]
        return _contiguous(list(check["word"]), letters) or _contiguous(_dedup(list(check["word"])), _dedup(letters))
    if kind == "count":  # at least min times, and not on and on (max) when the prompt said how many
        n = len(re.findall(re.escape(check["value"].lower()), re.sub(r"\s+", " ", low)))
        return int(check["min"]) <= n <= int(check.get("max", n))
    raise ValueError(f"unknown check type {kind!r}")


@dataclass
class Answer:
    prompt: dict[str, Any]
    text: str = ""
    finish: str | None = None
    stop_reason: Any = None
    tokens: int = 0
    error: str | None = None

    @property
    def loops(self) -> bool:
        return judge(self.text) is not None

    @property
    def correct(self) -> bool:
        return "check" in self.prompt and passes(self.prompt["check"], self.text)


@dataclass
class Run:
    """One config at one temperature and seed over the prompts."""

    config: str
    temperature: float
    seed: int
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0

    def part(self, keep: Callable[[dict[str, Any]], bool]) -> Run:
        return Run(self.config, self.temperature, self.seed, [a for a in self.answers if keep(a.prompt)], self.seconds)


@dataclass(frozen=True)
class Metrics:
    loop_rate: float  # share of answers outside "repeat" that the judge says loop
    length_stops: int
    factual: float
    repetition: float
    tokens: int
    cuts: int  # answers the gateway (or vLLM's repetition_detection) ended as a loop
    errors: int


# What each rate counts, per answer: (counted in this rate, its value). Loops in every category but "repeat";
# checks in "fact" and "repeat". The tables and the paired comparison (eval/paired.py) both read this.
MEASURES: dict[str, Callable[[Answer], tuple[bool, int]]] = {
    "loops": lambda a: (a.prompt["category"] != "repeat", int(a.loops)),
    "factual": lambda a: (a.prompt["category"] == "fact", int(a.correct)),
    "intended": lambda a: (a.prompt["category"] == "repeat", int(a.correct)),
}


def _share(answers: list[Answer], measure: str) -> float:
    values = [value for counted, value in map(MEASURES[measure], answers) if counted]
    return sum(values) / len(values) if values else float("nan")


def metrics(run: Run) -> Metrics:
    """Rates over the answers that came back: a failed request is counted in `errors`, not as an answer
    that neither loops nor passes its check."""
    answered = [a for a in run.answers if not a.error]
    return Metrics(
        loop_rate=_share(answered, "loops"),
        length_stops=sum(a.finish == "length" for a in answered),
        factual=_share(answered, "factual"),
        repetition=_share(answered, "intended"),
        tokens=sum(a.tokens for a in answered),
        cuts=sum(a.stop_reason == "loop_detected" or a.finish == "repetition" for a in answered),
        errors=len(run.answers) - len(answered),
    )


async def _ask(session: aiohttp.ClientSession, url: str, model: str, prompt: dict[str, Any], extra: dict[str, Any],
               temperature: float, seed: int, max_tokens: int, headers: dict[str, str]) -> Answer:  # fmt: skip
    messages = prompt.get("messages") or [{"role": "user", "content": prompt["prompt"]}]
    body = {"model": model, "messages": messages, "max_tokens": prompt.get("max_tokens", max_tokens),
            "temperature": temperature, "seed": seed, **extra}  # fmt: skip
    answer = Answer(prompt)
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                answer.error = f"{resp.status}: {data}"
                return answer
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        answer.error = repr(exc)
        return answer
    choice = data["choices"][0]
    answer.text = choice["message"].get("content") or ""
    answer.finish, answer.stop_reason = choice.get("finish_reason"), choice.get("stop_reason")
    answer.tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    return answer


def plan(
    configs: list[str], temperatures: list[float], seeds: int, seeded: Iterable[str], first_seed: int = 0
) -> list[tuple[str, float, int]]:
    """(config, temperature, seed) runs: greedy once; sampled with `seeds` seeds for `seeded` configs, else one.

    Seeds count from `first_seed`, so a later run can add seeds 3, 4, 5 to saved seeds 0, 1, 2.
    """
    many = set(seeded)

    def seeds_of(config: str, temperature: float) -> range:
        if temperature <= 0:
            return range(1)  # greedy: the seed changes nothing
        return range(first_seed, first_seed + (seeds if config in many else 1))

    return [(c, t, s) for t in temperatures for c in configs for s in seeds_of(c, t)]


async def run_eval(url: str, model: str, runs: list[tuple[str, float, int]], prompts: list[dict[str, Any]],
                   max_tokens: int = 384, concurrency: int = 32, api_key: str = "",
                   on_run: Callable[[Run], None] | None = None) -> list[Run]:  # fmt: skip
    """Every run, one after another, each with `concurrency` requests in flight."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    done = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for name, temperature, seed in runs:
            extra = config_fields(name)
            gate = asyncio.Semaphore(concurrency)

            async def one(p: dict[str, Any], extra: dict[str, Any] = extra, t: float = temperature,
                          s: int = seed, gate: asyncio.Semaphore = gate) -> Answer:  # fmt: skip
                async with gate:
                    return await _ask(session, url.rstrip("/"), model, p, extra, t, s, max_tokens, headers)

            # longest first, so the last wave is not one long answer alone
            order = sorted(prompts, key=lambda p: -p.get("max_tokens", max_tokens))
            start = time.perf_counter()
            answers = await asyncio.gather(*(one(p) for p in order))
            run = Run(name, temperature, seed, list(answers), time.perf_counter() - start)
            done.append(run)
            if on_run is not None:
                on_run(run)
    return done
