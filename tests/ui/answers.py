"""A small saved answers file (`governor eval loops --answers`), written with the eval's own writer: two configs,
one greedy run each, answers that loop, pass and fail their checks, and one request error."""

from __future__ import annotations

import gzip
from pathlib import Path

from governor.eval import loops as ev
from governor.eval import report

LOOP = "I like the sea. " * 12
COUNT = ", ".join(map(str, range(1, 21)))
OFF = {
    "story-01": (LOOP, "length"),
    "story-03": ("A girl found a key. The end.", "stop"),
    "fact-01": ("Paris.", "stop"),
    "repeat-01": (COUNT, "stop"),
    "list-01": ("1. Monday, 1. Monday, " * 12, "length"),
}
BALANCED = {
    "story-01": ("A calm poem about the sea.", "stop"),
    "story-03": ("She opened the shed.", "stop"),
    "fact-01": ("Rome.", "stop"),
    "repeat-01": ("1, 2, 3", "stop"),
    "list-01": ("Monday, Tuesday.", "stop"),
}


def runs() -> list[ev.Run]:
    prompts = {p["id"]: p for p in ev.load_prompts()}
    out = []
    for config, texts in (("off", OFF), ("balanced", BALANCED)):
        answers = [ev.Answer(prompts[i], text, finish, tokens=40) for i, (text, finish) in texts.items()]
        out.append(ev.Run(config, 0.0, 0, answers, 1.0))
    out[1].answers.append(ev.Answer(prompts["code-02"], error="503: engine_unavailable"))
    return out


def write(folder: Path, gzipped: bool = False) -> Path:
    """The file under `folder` (gzip-compressed when asked, as `--answers` files often are kept)."""
    path = folder / "answers.jsonl"
    report.write_answers(path, runs())
    if not gzipped:
        return path
    packed = folder / "answers.jsonl.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    return packed
