"""`run_eval` over real HTTP against the fake engine (named as a fake: it streams canned words).

Checks what the eval sends (chat turns, per-prompt max_tokens, temperature, seed, config fields) and
that it reads answers back; the real engine is exercised by test_eval_live.py.
"""

from __future__ import annotations

import asyncio

from governor.bench.fake_engine import FakeEngine, serve
from governor.engine.process import free_port
from governor.eval import loops as ev
from governor.eval import report


def test_run_eval_sends_each_prompt_as_planned_and_reads_answers() -> None:
    prompts = [p for p in ev.load_prompts("tune") if p["id"] in {"story-01", "chat-01", "long-01", "fact-01"}]
    fake = FakeEngine()
    port = free_port()
    runs = ev.plan(["balanced", "repetition_detection"], [0.0, 0.7], 2, ["balanced"])

    async def go() -> list[ev.Run]:
        runner = await serve(fake, port)
        try:
            return await ev.run_eval(f"http://127.0.0.1:{port}", "m", runs, prompts, max_tokens=24, concurrency=3)
        finally:
            await runner.cleanup()

    done = asyncio.run(go())
    assert [(r.config, r.temperature, r.seed) for r in done] == runs
    assert len(fake.requests) == len(runs) * len(prompts)
    by_prompt = {}
    for body in fake.requests:
        by_prompt.setdefault(body["messages"][-1]["content"], []).append(body)
    long_bodies = by_prompt[next(p["prompt"] for p in prompts if p["id"] == "long-01")]
    assert {b["max_tokens"] for b in long_bodies} == {1024}
    chat = next(p for p in prompts if p["id"] == "chat-01")
    assert by_prompt[chat["messages"][-1]["content"]][0]["messages"] == chat["messages"]
    story = by_prompt[next(p["prompt"] for p in prompts if p["id"] == "story-01")]
    assert sorted((b["decoding_preset"], b["temperature"], b["seed"], b["max_tokens"]) for b in story) == [
        ("balanced", 0.0, 0, 24), ("balanced", 0.7, 0, 24), ("balanced", 0.7, 1, 24),
        ("off", 0.0, 0, 24), ("off", 0.7, 0, 24)]  # fmt: skip
    assert all(b["repetition_detection"] == {"max_pattern_size": 32, "min_count": 3}
               for b in story if b["decoding_preset"] == "off")  # fmt: skip
    for run in done:
        assert all(a.text and a.finish == "length" and a.error is None for a in run.answers)
    assert "| balanced | 0.7 | 2 |" in report.summary(done)
