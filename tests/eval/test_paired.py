"""Paired comparison of saved eval runs: which answers pair up, the counts, the interval, the CLI."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import typer
from typer.testing import CliRunner

from governor.cli import eval as cli
from governor.eval import loops as ev
from governor.eval import paired, report

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
    assert "| off | 0.7 | 1 | 0.0% | 0 | 40.0% |" in ok.output  # its story loops: filtered out (9.1% with it)
    assert "| off | 0.7 | 0 | 7 of 10 | 0 vs 0 of 10: +0 (+0 to +0) | 7 vs 4 of 10: +3 (" in ok.output
    unknown = runner.invoke(app, ["report", str(path), "--category", "facts"])
    assert unknown.exit_code == 2 and "known: story" in unknown.output
    missing = runner.invoke(app, ["report", str(path), "--paired", "strict"])
    assert missing.exit_code == 2 and "no run of config 'strict'" in missing.output
    assert "### All prompts" not in missing.output  # refused before an hour of tables scrolls it away
    twice = tmp_path / "again.jsonl"
    twice.write_bytes(path.read_bytes())
    again = runner.invoke(app, ["report", str(path), str(twice)])
    assert again.exit_code == 2 and "answers fact-01 a second time" in again.output


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


def test_failed_requests_other_temperatures_and_missing_bases_pair_with_nothing() -> None:
    base, other = _run("a", 1, 10), _run("b", 1, 0)
    other.answers[0] = ev.Answer(FACTS[0], error="503: engine_unavailable")
    greedy = ev.Run("b", 0.0, 1, [ev.Answer(p, "I do not know.", "stop") for p in FACTS])
    (no_partner, c) = paired.compare([base, other, greedy], "a")
    assert (no_partner.temperature, no_partner.seeds, no_partner.paired) == (0.0, [], 0)
    assert c.differences["factual"].answers == 9  # the failed request is no wrong answer
    text = paired.table("a", [no_partner, c])
    assert "| b | 0 | none in common | 0 of 0 | - | - | - |" in text


def test_loops_leave_out_the_repeat_tasks_which_count_as_intended() -> None:
    task = next(p for p in ev.load_prompts(categories=["repeat"]) if p["check"]["type"] == "count")
    looped = "stop, " * 40  # a loop, and a failed "repeat n times" (too many)
    runs = [ev.Run(c, 0.7, s, [ev.Answer(task, looped if c == "b" else "x", "stop")]) for c in "ab" for s in (0, 2)]
    (c,) = paired.compare(runs, "a")
    assert c.differences["loops"].answers == 0 and c.differences["intended"].answers == 2
    assert "| b | 0.7 | 0, 2 |" in paired.table("a", [c])


def test_an_interval_end_just_under_zero_prints_as_plus_zero() -> None:
    cell = paired.table(
        "a", [paired.Comparison("b", 0.7, [0], {"factual": paired.Difference(3, 1, 9, -0.4, 4.6)}, 5, 9)]
    )
    assert "3 vs 1 of 9: +2 (+0 to +5)" in cell and "-0" not in cell
