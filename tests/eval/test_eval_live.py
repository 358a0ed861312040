"""A CI-sized sample of `governor eval loops` against the session's real engine (no extra engine start)."""

from __future__ import annotations

import asyncio

import pytest

from governor.eval import loops as ev
from governor.eval import report
from tests.conftest import Live

pytestmark = pytest.mark.engine

# only prompts of the tuning part: the held-out part is read in the full eval alone
SAMPLE = {"story-01", "list-19", "chat-19", "code-01", "fact-01", "repeat-01", "repeat-04"}


def test_sample_of_the_eval_runs_greedy_and_sampled(live: Live) -> None:
    prompts = [p for p in ev.load_prompts("tune") if p["id"] in SAMPLE]
    assert {p["id"] for p in prompts} == SAMPLE
    runs = ev.plan(["off", "balanced"], [0.0, 0.7], seeds=2, seeded=["balanced"])
    assert [(c, t) for c, t, _ in runs] == [("off", 0.0), ("balanced", 0.0), ("off", 0.7), ("balanced", 0.7),
                                            ("balanced", 0.7)]  # fmt: skip
    done = asyncio.run(ev.run_eval(live.url, live.model, runs, prompts, max_tokens=128, concurrency=8))

    for run in done:
        m = ev.metrics(run)
        assert m.errors == 0, [a.error for a in run.answers if a.error]
        assert all(a.text.strip() and a.tokens > 0 for a in run.answers)
        assert all(a.finish in ("stop", "length") for a in run.answers)
        assert m.tokens <= 128 * len(prompts)
    greedy = {r.config: r for r in done if r.temperature == 0}
    for run in greedy.values():
        answers = {a.prompt["id"]: a for a in run.answers}
        assert answers["fact-01"].correct, answers["fact-01"].text  # Paris, with and without the controls

    table = report.full_report(done, "all")
    assert "| balanced | 0.7 | 2 |" in table and "| off | 0 | 1 |" in table
    assert "Held-out part only" in table
