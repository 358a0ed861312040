"""The default preset's loop cut leaves correct answers to the tuning part's repetition tasks alone.

A non-streaming answer the cut fires on is trimmed to the first copy of its repeated block, so a cut
on "repeat the phrase four times" turns a right answer into a wrong one. Answers written as a
careful model would, in the shapes small models use (one per line, commas, a sentence around them).
"""

from __future__ import annotations

import pytest

from governor.eval.loops import load_prompts, passes
from governor.policy.presets import LOOP_FIELDS, builtin_presets
from governor.stream.loop_detector import LoopConfig, LoopDetector
from governor.stream.loop_trim import trim_to_first_copy

LINES = "\n".join
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
IDEAL = {
    "repeat-01": ["Sure! " + ", ".join(map(str, range(1, 21))) + ".", LINES(map(str, range(1, 21)))],
    "repeat-03": ["B-A-N-A-N-A", "The word banana is spelled: B, A, N, A, N, A."],
    "repeat-04": ["Hello hello hello hello hello", "Hello!\nHello!\nHello!\nHello!\nHello!"],
    "repeat-05": [", ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ")],
    "repeat-07": [LINES(["I will not talk in class."] * 3), "I will not talk in class. " * 3],
    "repeat-08": [LINES("ELEPHANT")],
    "repeat-09": [LINES(["Practice makes perfect."] * 4), "Practice makes perfect! " * 4],
    "repeat-11": [LINES(map(str, range(1, 16)))],
    "repeat-12": ["| Day | Open |\n|---|---|\n" + LINES(f"| {d} | yes |" for d in WEEKDAYS)],
    "repeat-13": ["Uno, dos, tres, cuatro, cinco, seis, siete, ocho, nueve, diez."],
    "repeat-15": ["M-I-S-S-I-S-S-I-P-P-I"],
    "repeat-16": [LINES(f"3 x {i} = {3 * i}" for i in range(1, 11))],
    "repeat-17": ["Yes, yes, yes, yes, yes, yes!", LINES(["Yes"] * 6)],
    "repeat-19": [", ".join(map(str, range(100, 111)))],
    "repeat-20": ["Go team go! Go team go! Go team go! We are the best!", LINES(["Go team go!"] * 3)],
    "repeat-21": ["R-H-Y-T-H-M"],
    "repeat-23": [LINES(["The quick brown fox."] * 3), ", ".join(["The quick brown fox"] * 3) + "."],
    "repeat-24": ["1, 3, 5, 7, 9, 11, 13, 15, 17, 19"],
    "repeat-25": ["Sunday, Saturday, Friday, Thursday, Wednesday, Tuesday, Monday"],
}
PROMPTS = {p["id"]: p for p in load_prompts("tune", ["repeat"])}


def _config(preset: str) -> LoopConfig:
    fields = builtin_presets()[preset].fields()
    return LoopConfig(**{name: fields[key] for key, name in LOOP_FIELDS.items() if key in fields})


def test_every_tuning_repetition_task_has_answers_here() -> None:
    assert set(IDEAL) == set(PROMPTS)


@pytest.mark.parametrize(("pid", "answer"), [(p, a) for p, answers in IDEAL.items() for a in answers])
def test_balanced_cut_spares_a_right_answer(pid: str, answer: str) -> None:
    check = PROMPTS[pid]["check"]
    assert passes(check, answer), "the answer itself is right"
    config = _config("balanced")
    assert LoopDetector(config).feed(answer) is None
    assert passes(check, trim_to_first_copy(answer, config))
