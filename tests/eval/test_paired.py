"""Paired comparison of saved eval runs: which answers pair up, the counts, the interval, the CLI."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import typer
from typer.testing import CliRunner

from governor.eval import cli, paired, report
from governor.eval import loops as ev

FACTS = ev.load_prompts(categories=["fact"])[:10]
STORY = ev.load_prompts(categories=["story"])[0]
LOOP = "I like the sea. " * 10


def _right(prompt: dict[str, Any]) -> str:
    text = " ".join(value.split("|")[0] for value in prompt["check"]["values"])
    assert ev.passes(prompt["check"], text), prompt["id"]
    return text


def _run(config: str, seed: int, right: int, story: str = "A calm poem.") -> ev.Run:
    """Facts: the first `right` answered right, the rest "I do not know."; one story answer."""
    answers = [ev.Answer(p, _right(p) if i < right else "I do not know.", "stop") for i, p in enumerate(FACTS)]
    return ev.Run(config, 0.7, seed, [*answers, ev.Answer(STORY, story, "stop")])


def test_identical_runs_differ_by_nothing() -> None:
    runs = [_run("a", 0, 6), _run("b", 0, 6)]
    (c,) = paired.compare(runs, "a")
    assert (c.config, c.seeds) == ("b", [0])
    assert c.differences["factual"] == paired.Difference(6, 6, 10, 0.0, 0.0)
    assert c.differences["loops"] == paired.Difference(0, 0, 11, 0.0, 0.0)
    assert c.differences["intended"].answers == 0
    assert (c.same_text, c.paired) == (11, 11)


def test_counts_pair_only_the_seeds_both_ran_and_the_interval_brackets_the_difference() -> None:
    runs = [_run("a", 0, 10), _run("a", 1, 10), _run("b", 1, 5, LOOP), _run("b", 2, 0)]
    (c,) = paired.compare(runs, "a")
    assert c.seeds == [1]  # seed 0 has no partner, seed 2 no base
    fact = c.differences["factual"]
    assert (fact.base, fact.other, fact.answers) == (10, 5, 10)
    assert 0 < fact.low <= 5 <= fact.high <= 10  # five prompts right only for "a": the gap is no accident
    assert (c.differences["loops"].base, c.differences["loops"].other) == (0, 1)
    assert (c.same_text, c.paired) == (5, 11)  # five facts wrong for "b" and its story loops


def test_one_prompt_with_all_its_seeds_is_one_draw() -> None:
    # Base wins on one prompt in each of 8 seeds: resampling prompts (not answers) keeps that prompt's 8 together,
    # so the interval reaches 0 (the prompt left out) rather than claiming 8 independent wins.
    runs = [_run(c, s, 1 if c == "a" else 0) for c in "ab" for s in range(8)]
    fact = paired.compare(runs, "a")[0].differences["factual"]
    assert (fact.base - fact.other, fact.low) == (8, 0.0)
    assert paired.difference([], np.random.default_rng(0)).answers == 0


def test_table_names_each_comparison() -> None:
    runs = [_run("a", s, 8) for s in range(3)] + [_run("b", s, 9) for s in range(3)]
    text = paired.table("a", paired.compare(runs, "a"))
    assert "| b | 0.7 | 0-2 | 30 of 33 | 0 vs 0 of 33: +0 (+0 to +0) | 24 vs 27 of 30: -3 (" in text
    assert text.rstrip().endswith("| - |")


def test_report_cli_filters_categories_and_pairs(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    report.write_answers(path, [_run("off", 0, 4, LOOP), _run("balanced", 0, 7)])
    app = typer.Typer()
    cli.register(app)
    runner = CliRunner()
    ok = runner.invoke(app, ["report", str(path), "--category", "fact", "--paired", "balanced"])
    assert ok.exit_code == 0, ok.output
    assert "| balanced | 0.7 | 1 | 0.0% | 0 | 70.0% |" in ok.output  # the story's loop is filtered out
    assert "| off | 0.7 | 0 | 7 of 10 | 0 vs 0 of 10: +0 (+0 to +0) | 7 vs 4 of 10: +3 (" in ok.output
    unknown = runner.invoke(app, ["report", str(path), "--category", "facts"])
    assert unknown.exit_code == 2 and "known: story" in unknown.output
    missing = runner.invoke(app, ["report", str(path), "--paired", "strict"])
    assert missing.exit_code == 2 and "no run of config 'strict'" in missing.output


def test_the_interval_does_not_depend_on_the_order_answers_arrive_in() -> None:
    draw = random.Random(5)  # varied per-prompt sums: with uniform ones any order gives the same percentiles
    pairs = [(f"p{i:02d}", int(draw.random() < 0.7), int(draw.random() < 0.6)) for i in range(30) for _ in range(6)]
    forward = paired.difference(pairs, np.random.default_rng(0))
    backward = paired.difference(pairs[::-1], np.random.default_rng(0))
    assert forward == backward


def test_an_interval_depends_on_its_own_answers_only() -> None:
    # The factual interval must not move when the stories (counted for loops only) are left out of the report.
    draw = random.Random(2)  # one of the draws where a generator shared across measures moved this interval
    runs = [
        _run(c, s, draw.randrange(11), LOOP if draw.random() < 0.5 else "calm") for c in ("a", "bb") for s in range(6)
    ]
    facts_only = [r.part(lambda p: p["category"] == "fact") for r in runs]
    whole, narrow = paired.compare(runs, "a")[0], paired.compare(facts_only, "a")[0]
    assert whole.differences["factual"] == narrow.differences["factual"]
    assert whole.differences["loops"].answers == 66 and narrow.differences["loops"].answers == 60
