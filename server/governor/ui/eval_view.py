"""The eval view's data: a saved answers file (`governor eval loops --answers`, JSON lines, maybe gzip) read
and re-judged as `governor eval report` does, as JSON the page draws its charts and answer list from.

Every answer is judged once (the judge takes milliseconds per answer, and the summary, the per-category
counts and the answer list all need its verdict); the summary rows are `eval.loops.metrics` of each run,
averaged over seeds as the report's table does, the per-category counts summed over seeds as its
per-category table does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import zlib
from typing import Any

from governor.errors import InvalidRequest, PayloadTooLarge
from governor.eval.judge import judge
from governor.eval.loops import CATEGORIES, CHECKED, Answer, Run, metrics
from governor.eval.report import parse_answers

# A full eval's answers are a few MB (gzip a third of that): 32 MB as sent and once inflated leaves room
# many times over, while one judging's peak (the text, its rows, the JSON reply) stays a few hundred MB.
MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_TEXT_BYTES = 32 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass
class _Judged(Answer):
    """An answer whose loop verdict is computed on first use and kept."""

    @functools.cached_property
    def loops(self) -> bool:  # type: ignore[override]
        return judge(self.text) is not None


def decompress(raw: bytes) -> bytes:
    """The file's text: gunzipped when it starts as gzip does (a name says nothing here), bounded.

    Several gzip members (what `cat a.gz b.gz` makes, and gzip.decompress reads) are read one after another;
    a member cut short, or bytes after the last that are not another member, are refused: a truncated
    upload judged as if whole would give wrong numbers without a word."""
    if not raw.startswith(GZIP_MAGIC):
        return raw
    parts: list[bytes] = []
    size, rest = 0, raw
    while rest:
        if not rest.startswith(GZIP_MAGIC):
            raise InvalidRequest("The file has bytes after its gzip data.", code="invalid_answers")
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            part = inflater.decompress(rest, MAX_TEXT_BYTES - size + 1)
        except zlib.error as exc:
            raise InvalidRequest(f"The file is not valid gzip: {exc}", code="invalid_answers") from exc
        size += len(part)
        if size > MAX_TEXT_BYTES:
            raise PayloadTooLarge(f"The answers file inflates past {MAX_TEXT_BYTES} bytes.")
        if not inflater.eof:
            raise InvalidRequest("The gzip file is cut short (truncated upload?).", code="invalid_answers")
        parts.append(part)
        rest = inflater.unused_data
    return b"".join(parts)


def report(raw: bytes, name: str = "answers") -> dict[str, Any]:
    """Summary per config and temperature, counts per category, and every answer, from one answers file."""
    try:
        runs = parse_answers([(name, decompress(raw))])
    except ValueError as exc:  # a malformed row, an unknown prompt id, a run twice, text not UTF-8
        raise InvalidRequest(f"Not a `governor eval loops --answers` file: {exc}", code="invalid_answers") from exc
    runs = [dataclasses.replace(r, answers=[_judged(a) for a in r.answers]) for r in runs]
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.config, run.temperature), []).append(run)
    rows, answers = [], []
    for index, ((config, temperature), group) in enumerate(groups.items()):
        rows.append(_summary(config, temperature, group))
        for run in group:
            answers += [_answer(index, run.seed, a) for a in run.answers]
    return {"categories": list(CATEGORIES), "checked": list(CHECKED), "groups": rows, "answers": answers}


def _judged(answer: Answer) -> _Judged:
    return _Judged(**{f.name: getattr(answer, f.name) for f in dataclasses.fields(answer)})


def _mean(values: list[float]) -> float | None:
    """Mean over seeds; None where a rate has nothing to count (JSON has no NaN)."""
    if not values or any(math.isnan(v) for v in values):
        return None
    return statistics.fmean(values)


def _summary(config: str, temperature: float, group: list[Run]) -> dict[str, Any]:
    ms = [metrics(r) for r in group]
    row: dict[str, Any] = {
        "config": config,
        "temperature": temperature,
        "label": f"{config} t={temperature:g}",
        "seeds": [r.seed for r in group],
        "loop_rate": _mean([m.loop_rate for m in ms]),
        "factual": _mean([m.factual for m in ms]),
        "intended": _mean([m.repetition for m in ms]),
        "length_stops": _mean([float(m.length_stops) for m in ms]),
        "tokens": _mean([float(m.tokens) for m in ms]),
        "cuts": _mean([float(m.cuts) for m in ms]),
        "errors": sum(m.errors for m in ms),
    }
    categories = {}
    for cat in CATEGORIES:
        answered = [a for r in group for a in r.answers if a.prompt["category"] == cat and not a.error]
        hits = sum(a.correct if cat in CHECKED else a.loops for a in answered)
        categories[cat] = {"answers": len(answered), "hits": hits, "measure": "ok" if cat in CHECKED else "loops"}
    row["categories"] = categories
    return row


def _answer(group: int, seed: int, a: Answer) -> dict[str, Any]:
    prompt = a.prompt
    asked = prompt.get("prompt") or json.dumps(prompt.get("messages", []), ensure_ascii=False)
    return {
        "group": group,
        "seed": seed,
        "id": prompt["id"],
        "category": prompt["category"],
        "split": prompt["split"],
        "prompt": asked,
        "finish": a.finish,
        "stop_reason": a.stop_reason,
        "tokens": a.tokens,
        "loops": None if a.error or prompt["category"] == "repeat" else a.loops,
        "correct": a.correct if "check" in prompt and not a.error else None,
        "error": a.error,
        "text": a.text,
    }
