"""The eval's prompt set, checks, run plan and tables (no engine: answers are written here)."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest

from governor.eval import loops as ev
from governor.eval import report


def test_prompt_set_is_big_varied_and_has_a_held_out_part() -> None:
    rows = ev.load_prompts()
    assert len(rows) >= 200
    assert len({r["id"] for r in rows}) == len(rows)
    per = Counter(r["category"] for r in rows)
    assert set(per) == set(ev.CATEGORIES) and min(per.values()) >= 14
    held = [r for r in rows if r["split"] == "holdout"]
    assert len(held) >= 50 and {r["category"] for r in held} == set(ev.CATEGORIES)
    assert {r["split"] for r in rows} == {"tune", "holdout"}
    for r in rows:
        assert ("check" in r) == (r["category"] in ev.CHECKED), r["id"]
        assert (r.get("max_tokens") == 1024) == (r["category"] == "long"), r["id"]
        assert ("messages" in r) == (r["category"] == "chat"), r["id"]
    assert all(m["role"] == "user" for r in rows if "messages" in r for m in r["messages"][-1:])
    assert len(ev.load_prompts("holdout")) == len(held)
    assert len(ev.load_prompts("tune", ["fact"], 3)) == 3


@pytest.mark.parametrize(
    ("check", "text", "ok"),
    [
        ({"type": "word", "values": ["au"]}, "The symbol is Au.", True),
        ({"type": "word", "values": ["au"]}, "Gold, because it shines.", False),
        ({"type": "all", "values": ["spring", "autumn|fall"]}, "Spring, summer, fall, winter", True),
        ({"type": "all", "values": ["spring", "autumn|fall"]}, "Spring and summer", False),
        ({"type": "count", "value": "stop", "min": 3, "max": 5}, "stop, stop, stop, stop", True),
        ({"type": "count", "value": "stop", "min": 3, "max": 5}, "stop, " * 40, False),  # on and on is no answer
        ({"type": "count", "value": "go team go", "min": 2}, "Go team\ngo! Go team go!", True),
        ({"type": "sequence", "values": ["1", "2", "3"]}, "1.\n2.\n3.", True),
        ({"type": "spell", "word": "rhythm"}, "R-H-Y-T-H-M", True),
    ],
)
def test_checks(check: dict[str, object], text: str, ok: bool) -> None:
    assert ev.passes(check, text) is ok


def test_every_shipped_check_can_pass_and_fail() -> None:
    for r in ev.load_prompts():
        if "check" in r:
            assert not ev.passes(r["check"], "I do not know."), r["id"]


def test_plan_seeds_only_the_named_configs_when_sampling() -> None:
    runs = ev.plan(["off", "balanced", "strict"], [0.0, 0.7], 3, ["off", "balanced"])
    assert runs[:3] == [("off", 0.0, 0), ("balanced", 0.0, 0), ("strict", 0.0, 0)]
    assert Counter(c for c, t, _ in runs if t > 0) == {"off": 3, "balanced": 3, "strict": 1}


def test_plan_adds_seeds_after_saved_ones() -> None:
    runs = ev.plan(["off", "frequency_penalty=0.5"], [0.0, 0.7], 3, ["off"], first_seed=3)
    assert [r for r in runs if r[1] == 0.0] == [("off", 0.0, 0), ("frequency_penalty=0.5", 0.0, 0)]
    assert [r for r in runs if r[1] > 0] == [("off", 0.7, 3), ("off", 0.7, 4), ("off", 0.7, 5),
                                             ("frequency_penalty=0.5", 0.7, 3)]  # fmt: skip


def test_config_variants() -> None:
    assert ev.config_fields("repetition_detection")["repetition_detection"] == {"max_pattern_size": 32, "min_count": 3}
    assert ev.config_fields("balanced+dry_multiplier=1.5+loop_detection=false") == {
        "decoding_preset": "balanced", "dry_multiplier": 1.5, "loop_detection": False}  # fmt: skip
    assert ev.config_fields("balanced+dry_scope=output")["dry_scope"] == "output"  # not JSON: a string
    with pytest.raises(ValueError, match="not field=value"):
        ev.config_fields("balanced+dry_scope")


def _run(config: str, seed: int, texts: dict[str, tuple[str, str]]) -> ev.Run:
    prompts = {p["id"]: p for p in ev.load_prompts()}
    answers = [ev.Answer(prompts[i], text, finish, tokens=10) for i, (text, finish) in texts.items()]
    return ev.Run(config, 0.7 if seed else 0.0, seed, answers, 2.0)


def _prompt(pid: str) -> dict[str, object]:
    return next(p for p in ev.load_prompts() if p["id"] == pid)


def test_metrics_and_tables() -> None:
    loop = "I like the sea. " * 10
    count = ", ".join(map(str, range(1, 21)))
    off = _run("off", 0, {"story-01": (loop, "length"), "fact-01": ("Paris.", "stop"),
                          "repeat-01": (count, "stop"), "code-02": ("print(1)", "stop")})  # fmt: skip
    calm = {"story-01": ("A calm poem.", "stop"), "fact-01": ("Rome", "stop"),
            "repeat-01": ("1, 2, 3", "stop"), "code-02": ("x", "stop")}  # fmt: skip
    bal = [_run("balanced", s, calm) for s in (1, 2)]
    m = ev.metrics(off)
    # loop rate: every category but "repeat", facts included
    assert (m.loop_rate, m.length_stops, m.factual, m.repetition, m.tokens) == (1 / 3, 1, 1.0, 1.0, 40)
    assert ev.metrics(bal[0]).loop_rate == 0.0 and ev.metrics(bal[0]).factual == 0.0
    table = report.full_report([off, *bal], "all")
    assert "| off | 0 | 1 | 33.3% | 1 | 100.0% | 100.0% | 40 |" in table
    assert "| balanced | 0.7 | 2 | 0.0% | 0 | 0.0% | 0.0% | 40 |" in table
    assert "1/1 loops" in report.by_category([off]) and "0/2 loops" in report.by_category(bal)
    held = report.summary([off], lambda p: p["split"] == "holdout")  # code-02 alone is held out
    assert "| off | 0 | 1 | 0.0% | 0 |" in held
    assert report.looping(off) == ["story-01"]


def test_a_failed_request_is_an_error_not_an_answer() -> None:
    run = _run("balanced", 0, {"story-01": ("I like the sea. " * 10, "length"), "fact-01": ("Paris.", "stop")})
    run.answers.append(ev.Answer(_prompt("story-02"), error="ServerDisconnectedError('Server disconnected')"))
    run.answers.append(ev.Answer(_prompt("fact-02"), error="503: engine_unavailable"))
    m = ev.metrics(run)
    # loops: 1 of the 2 answers (story-01, fact-01), not 1 of 4; facts: 1 right of 1 answered, not 1 of 2
    assert (m.loop_rate, m.factual, m.errors) == (0.5, 1.0, 2)


def test_saved_answers_come_back_as_runs_and_the_common_part_drops_failed_prompts(tmp_path: Path) -> None:
    off = _run("off", 0, {"story-01": ("I like the sea. " * 10, "length"), "fact-01": ("Paris.", "stop")})
    bal = _run("balanced", 0, {"story-01": ("A calm poem.", "stop")})
    bal.answers.append(ev.Answer(_prompt("fact-01"), error="503: engine_unavailable"))
    path = tmp_path / "answers.jsonl"
    report.write_answers(path, [off, bal])
    back = report.read_answers([path])
    assert [(r.config, r.temperature, len(r.answers)) for r in back] == [("off", 0.0, 2), ("balanced", 0.0, 2)]
    a, b = ev.metrics(back[0]), ev.metrics(off)
    assert (a.loop_rate, a.factual, a.length_stops, a.tokens) == (b.loop_rate, b.factual, b.length_stops, b.tokens)
    assert ev.metrics(back[1]).errors == 1
    gz = tmp_path / "answers.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [len(r.answers) for r in report.read_answers([gz])] == [2, 2]
    written = tmp_path / "written.jsonl.gz"  # a .gz name is written compressed, run by run as the CLI does
    report.write_answers(written, [])
    report.write_answers(written, [off], append=True)
    report.write_answers(written, [bal], append=True)
    assert gzip.decompress(written.read_bytes()) == path.read_bytes()
    common, dropped = report.common_part(back)
    assert dropped == {"fact-01"}
    assert [[a.prompt["id"] for a in r.answers] for r in common] == [["story-01"], ["story-01"]]
