"""Markdown tables of `governor eval loops` runs: overall, per category, held-out part alone."""

from __future__ import annotations

import gzip
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from governor.eval.loops import CATEGORIES, CHECKED, Answer, Metrics, Run, load_prompts, metrics


def _groups(runs: list[Run]) -> list[list[Run]]:
    """Runs of one config at one temperature (its seeds), in first-seen order."""
    out: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        out.setdefault((run.config, run.temperature), []).append(run)
    return list(out.values())


def _spread(values: list[float], fmt: Callable[[float], str]) -> str:
    """Mean, and min-max across seeds when there are several."""
    if any(math.isnan(v) for v in values):
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1 or min(values) == max(values):
        return fmt(mean)
    return f"{fmt(mean)} ({fmt(min(values))}-{fmt(max(values))})"


def _pct(v: float) -> str:
    return f"{v:.1%}"


def _num(v: float) -> str:
    return f"{v:,.0f}"


def summary(runs: list[Run], keep: Callable[[dict[str, Any]], bool] = lambda p: True) -> str:
    """One row per config and temperature: means over seeds, with the seeds' range in brackets."""
    head = (
        "| config | temp | seeds | loop rate | length stops | factual | intended rep. | tokens | cuts | errors | s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for group in _groups(runs):
        ms: list[Metrics] = [metrics(r.part(keep)) for r in group]
        first = group[0]

        def col(get: Callable[[Metrics], float], fmt: Callable[[float], str], ms: list[Metrics] = ms) -> str:
            return _spread([get(m) for m in ms], fmt)

        rows.append(
            f"| {first.config} | {first.temperature:g} | {len(group)} | {col(lambda m: m.loop_rate, _pct)} | "
            f"{col(lambda m: m.length_stops, _num)} | {col(lambda m: m.factual, _pct)} | "
            f"{col(lambda m: m.repetition, _pct)} | {col(lambda m: m.tokens, _num)} | {col(lambda m: m.cuts, _num)} | "
            f"{sum(m.errors for m in ms)} | {statistics.fmean(r.seconds for r in group):.0f} |"
        )
    return "\n".join([head, *rows])


def by_category(runs: list[Run], keep: Callable[[dict[str, Any]], bool] = lambda p: True) -> str:
    """Loops (judged) per category; for fact and repeat, answers that pass their checks. Summed over seeds."""
    head = "| config | temp | " + " | ".join(CATEGORIES) + " |\n|---|---:|" + "---:|" * len(CATEGORIES)
    rows = []
    for group in _groups(runs):
        cells = []
        for cat in CATEGORIES:
            answers = [a for r in group for a in r.answers
                       if a.prompt["category"] == cat and keep(a.prompt) and not a.error]  # fmt: skip
            hits = sum(a.correct if cat in CHECKED else a.loops for a in answers)
            label = "ok" if cat in CHECKED else "loops"
            cells.append(f"{hits}/{len(answers)} {label}" if answers else "-")
        rows.append(f"| {group[0].config} | {group[0].temperature:g} | " + " | ".join(cells) + " |")
    return "\n".join([head, *rows])


def full_report(runs: list[Run], split: str) -> str:
    parts = [f"### All prompts ({split})", summary(runs), "", "### Per category", by_category(runs)]
    if split == "all":
        parts += ["", "### Tuning part only", summary(runs, lambda p: p["split"] == "tune"),
                  "", "### Held-out part only", summary(runs, lambda p: p["split"] == "holdout")]  # fmt: skip
    return "\n".join(parts)


def looping(run: Run) -> list[str]:
    """Ids of the answers the judge says loop, for tuning (only ever on the tuning part)."""
    return [a.prompt["id"] for a in run.answers if a.prompt["category"] != "repeat" and a.loops]


def write_answers(path: Path, runs: list[Run], *, append: bool = False) -> None:
    """Every answer as a JSON line, to read while tuning; gzip-compressed where the name ends in .gz, as
    ``read_answers`` reads it (an append adds a gzip member: a reader reads the members as one stream)."""
    lines = []
    for run in runs:
        for a in run.answers:
            verdict = None if a.prompt["category"] == "repeat" else _verdict(a.text)
            row = {"config": run.config, "temperature": run.temperature, "seed": run.seed, "id": a.prompt["id"],
                   "split": a.prompt["split"], "finish": a.finish, "stop_reason": a.stop_reason,
                   "tokens": a.tokens, "correct": a.correct if "check" in a.prompt else None,
                   "loop": verdict, "error": a.error, "text": a.text}  # fmt: skip
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    data = "".join(lines).encode("utf-8")
    with path.open("ab" if append else "wb") as out:
        out.write(gzip.compress(data) if path.suffix == ".gz" else data)


def _verdict(text: str) -> dict[str, Any] | None:
    from governor.eval.judge import judge

    v = judge(text)
    return None if v is None else {"kind": v.kind, "copies": v.copies, "block": v.block}


def read_answers(paths: list[Path]) -> list[Run]:
    """Runs back from `--answers` files (or their .gz), with each answer's prompt (and check) from the shipped set, so a
    run on another machine can be reported, re-judged or compared here."""
    return parse_answers([(str(p), gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes())
                          for p in paths])  # fmt: skip


class AnswerRow(BaseModel):
    """One line of an `--answers` file as `write_answers` writes it; extra fields (its verdicts) are re-derived."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    config: StrictStr
    temperature: float = Field(ge=0)
    seed: int = Field(ge=0, lt=2**63)
    id: StrictStr
    finish: StrictStr | None
    stop_reason: StrictStr | StrictInt | None  # vLLM's: a stop string, a stop token id, or none
    tokens: int = Field(ge=0, lt=2**63)
    error: StrictStr | None
    text: StrictStr


def parse_answers(files: list[tuple[str, bytes]]) -> list[Run]:
    """`read_answers` for contents already read (and decompressed), each with the name its errors give.

    Every row is validated before it is used: a file from elsewhere (the web page takes uploads) with a
    null text or a NaN temperature is a ValueError naming its line, never a crash further on."""
    prompts = {p["id"]: p for p in load_prompts()}
    runs: dict[tuple[str, float, int], Run] = {}
    seen: set[tuple[str, float, int, str]] = set()
    for path, raw in files:
        for number, line in enumerate(raw.decode("utf-8").split("\n"), 1):  # not splitlines: U+2028 in texts
            if not line:
                continue
            try:
                row = AnswerRow.model_validate_json(line)
            except ValidationError as exc:
                raise ValueError(f"{path}:{number}: not an answers row: {_first_error(exc)}") from None
            if row.id not in prompts:
                raise ValueError(f"{path}:{number}: unknown prompt id {row.id!r}")
            key = (row.config, row.temperature, row.seed)
            if (*key, row.id) in seen:  # counted twice in the tables, once when paired: refuse instead
                raise ValueError(f"{path}: {row.config} t={row.temperature:g} seed={row.seed} answers {row.id} a "
                                 "second time (the same run in two files?)")  # fmt: skip
            seen.add((*key, row.id))
            run = runs.setdefault(key, Run(*key))
            run.answers.append(Answer(prompts[row.id], row.text, row.finish, row.stop_reason, row.tokens, row.error))
    return list(runs.values())


def _first_error(exc: ValidationError) -> str:
    """The first problem, short: the field and pydantic's message (a long text's value is not echoed back)."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "line"
    return f"{where}: {first['msg']}"


def common_part(runs: list[Run]) -> tuple[list[Run], set[str]]:
    """The runs restricted to prompts every run answered (no request error), and the ids dropped."""
    failed = {a.prompt["id"] for r in runs for a in r.answers if a.error}
    return [r.part(lambda p: p["id"] not in failed) for r in runs], failed
