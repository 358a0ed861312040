"""The eval's loop judge on hand-written answers: loops it must see, legitimate repetition it must leave."""

from __future__ import annotations

import pytest

from governor.eval.judge import judge

STANZA = (
    "The sea is wide and the sky is grey,\n"
    "the gulls are calling across the bay,\n"
    "the boats come home at the end of day,\n"
    "and the waves keep rolling far away.\n\n"
)
POEM_ONE_WORD_CHANGED = (
    STANZA
    + STANZA.replace("grey", "blue").replace("calling", "crying").replace("home", "back").replace("far", "so")
    + STANZA.replace("wide", "deep").replace("bay", "shore").replace("end", "close").replace("rolling", "coming")
    + STANZA.replace("sky", "sun")
)
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank"]
CYCLING_LIST = "Here is the plan:\n" + "\n".join(
    f"{i + 1}. {NAMES[i % 6]} brings {2 * i + 3} cups of flour to the kitchen." for i in range(14)
)

LOOPS = {
    "exact sentence": "I like the sea. " * 8,
    "digit run": "The answer is 5" + "5" * 120,
    "phrase in a line": "and the night goes on and on and on and on and on and on and on and on and on",
    "poem, one word changed per line": POEM_ONE_WORD_CHANGED,
    "cycling names, numbers grow": CYCLING_LIST,
    "same line back": "\n".join(["The little cat sat on the red mat today."] * 3),
    "recurring sentence": "\n".join(
        f"{line}\nI love you more than words can say."
        for line in [
            "The rain is soft tonight.",
            "Snow fell on the roof of our old house.",
            "Wind!",
            "When the sun comes up we walk to the river and back.",
            "Moonlight.",
            "Stars are out.",
            "The sea is calm, the boats are in.",
        ]
    ),
    "two long copies filling the answer": (
        "Monday we went to the market and bought apples.\nTuesday we walked to the park with the dog.\n"
        "Wednesday it rained all day and we stayed in.\n"
    )
    * 2,
}

CHORUS = "Oh lighthouse keeper, keep your light,\nguide the sailors through the night.\n"
NOT_LOOPS = {
    "numbered list": "\n".join(
        f"{i}. {t}"
        for i, t in enumerate(
            ["Go to bed early.", "Avoid screens.", "Keep the room cool.", "Exercise daily.", "Skip late coffee."], 1
        )
    ),
    "song with a chorus": "\n".join(
        f"Verse {i}:\n{v}\n\nChorus:\n{CHORUS}"
        for i, v in enumerate(
            [
                "He climbs the stairs at dusk each day,\nhe trims the wick and lights the way.",
                "The storm comes in with wind and hail,\nhe sees a ship with a torn sail.",
                "At dawn the sea is calm and bright,\nhe sleeps at last after the night.",
            ],
            1,
        )
    ),
    "refrain poem": "\n\n".join(
        f"{a}\n{b}\nand the river runs on."
        for a, b in [
            ("The hills are green in spring,", "the birds begin to sing,"),
            ("The summer sun is high,", "the fields are gold and dry,"),
            ("The autumn leaves are red,", "the garden goes to bed,"),
            ("The winter nights are long,", "the fire hums its song,"),
        ]
    ),
    "code with a loop": "```python\nfor i in range(1, 21):\n    print(i)\n```\n"
    "```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```",
    "unrolled code": "\n".join(f"x[{i}] = compute(x[{i - 1}], {i})" for i in range(1, 12)),
    "json of users": "[\n"
    + ",\n".join(f'  {{"id": {i}, "name": "User {i}", "email": "user{i}@example.com"}}' for i in range(1, 11))
    + "\n]",
    "table with repeated cells": "| Day | Open |\n|---|---|\n"
    + "\n".join(f"| {d} | yes |" for d in ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]),
    "multiplication table": "\n".join(f"7 x {i} = {7 * i}" for i in range(1, 11)),
    "items with one word changed": "\n".join(
        f"The little cat sat on the {w} mat today." for w in ["red", "blue", "green", "old", "new", "soft"]
    ),
    "template plan": "\n".join(f"Week {i}: run {i + 1} km on three days" for i in range(1, 9)),
    "counting": ", ".join(str(i) for i in range(1, 101)),
    "rule lines": "Title\n" + "-" * 60 + "\nBody text here.\n" + "=" * 60,
    "short emphasis": "Yes yes yes, I will come!",
    "story": "Mira found a small brass key under the roses. She turned it over in her hand. "
    "The key was warm, as if someone had just held it. Behind the shed she found a door she had never seen. "
    "It opened with a sigh, and a garden full of silver birds lay beyond.",
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_loops_are_seen(name: str) -> None:
    assert judge(LOOPS[name]) is not None, name


@pytest.mark.parametrize("name", list(NOT_LOOPS))
def test_legitimate_repetition_is_left_alone(name: str) -> None:
    assert judge(NOT_LOOPS[name]) is None, judge(NOT_LOOPS[name])


def test_kinds() -> None:
    assert judge(LOOPS["exact sentence"]).kind == "periodic"  # type: ignore[union-attr]
    assert judge(POEM_ONE_WORD_CHANGED).kind == "near_repeat"  # type: ignore[union-attr]
    assert judge(CYCLING_LIST).kind == "near_repeat"  # type: ignore[union-attr]
    assert judge(LOOPS["recurring sentence"]).kind == "recurring"  # type: ignore[union-attr]


def test_one_cycle_of_names_is_a_list() -> None:
    assert judge("\n".join(CYCLING_LIST.splitlines()[:7])) is None
