"""Trimming a finished answer right after the first copy of its loop."""

from __future__ import annotations

import pytest

from governor.stream.loop_trim import trim_to_first_copy

from .test_loop_detector import CFG, LEGIT, LOOPS, Loop, _loop_text, run, tokens


@pytest.mark.parametrize("case", LOOPS, ids=lambda c: c.name)
def test_trim_keeps_text_up_to_the_first_copy(case: Loop) -> None:
    assert trim_to_first_copy(_loop_text(case), CFG) == case.trimmed
    # the relay trims what it holds when the detector fires, which must give the same answer
    _, fed = run(tokens(_loop_text(case)))
    assert trim_to_first_copy(fed, CFG) == case.trimmed


def test_trim_maps_back_through_case_and_whitespace() -> None:
    text = "Intro:\n\n" + "Der  Fluss   FLIESST ruhig\tdurch das Tal\n" * 10
    assert trim_to_first_copy(text, CFG) == "Intro:\n\nDer  Fluss   FLIESST ruhig\tdurch das Tal"


def test_trim_returns_text_without_loop_unchanged() -> None:
    assert trim_to_first_copy(LEGIT["prose"], CFG) == LEGIT["prose"]
    assert trim_to_first_copy("", CFG) == ""
