"""Loop detector: every loop family is cut early; legitimate repetition is never cut."""

from __future__ import annotations

import random
import re
import sys
from collections import deque
from dataclasses import dataclass

import pytest

from governor.stream.loop_detector import LoopConfig, LoopDetector, LoopVerdict, has_repeated_block
from governor.stream.loop_trim import trim_to_first_copy

CFG = LoopConfig()


def tokens(text: str) -> list[str]:
    """Token-sized pieces, roughly as a BPE model streams them (leading space, ≤4 letters)."""
    return re.findall(r"\s*\S{1,4}|\s+", text)


def run(pieces: list[str], config: LoopConfig = CFG) -> tuple[LoopVerdict | None, str]:
    """Feed pieces until the detector fires; return the verdict and the text fed so far."""
    det = LoopDetector(config)
    fed: list[str] = []
    for piece in pieces:
        fed.append(piece)
        if det.feed(piece) is not None:
            break
    return det.verdict, "".join(fed)


@dataclass(frozen=True)
class Loop:
    name: str
    prefix: str
    body: str  # the looping part, as a small model writes it until max_tokens
    unit: str  # a full copy of the repeated block, as it appears in the raw text
    max_copies: int  # full copies of unit a reader may see before the cut
    trimmed: str  # trim_to_first_copy of the whole text


POEM_LINE = "The waves are rolling on the shore\n"
PARAGRAPH = (
    "Photosynthesis is the process by which plants turn light into chemical energy. "
    "It takes place in the chloroplasts, which hold the green pigment chlorophyll. "
    "The plant releases oxygen as a by-product.\n\n"
)
SORRY = "I'm sorry, but I can't help with that request."
FILLERS = [
    "Is there anything else?",
    "Maybe try another topic.",
    "Ask me about science instead.",
    "I can help with something else.",
    "Let me know what you need.",
    "Perhaps a recipe?",
]
WEEK = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
SCHEDULE = "Here is your schedule:\n" + "".join(f"{i}. {WEEK[(i - 1) % 7]}\n" for i in range(1, 22))

LOOPS = [
    Loop(
        "poem line",
        "Here is a short poem about the sea:\n\n",
        POEM_LINE * 40,
        POEM_LINE,
        2,
        "Here is a short poem about the sea:\n\nThe waves are rolling on the shore",
    ),
    Loop("paragraph", "Sure.\n\n", PARAGRAPH * 6, PARAGRAPH, 2, "Sure.\n\n" + PARAGRAPH.rstrip()),
    Loop(
        "sentence",
        "Let me think. ",
        "I think the best way to solve this is to try again. " * 30,
        "I think the best way to solve this is to try again. ",
        2,
        "Let me think. I think the best way to solve this is to try again.",
    ),
    Loop("short phrase", "Answer: ", "Yes, I can. " * 60, "Yes, I can. ", 7, "Answer: Yes, I can."),
    Loop("digit run", "The answer is ", "5" * 800, "5", 272, "The answer is 5"),
    Loop("digit list", "The answer is ", "5, " * 300, "5, ", 92, "The answer is 5,"),
    Loop(
        "numbered line",
        SCHEDULE,
        "".join(f"{i}. Monday\n" for i in range(22, 300)),
        "Monday\n",
        16,
        SCHEDULE + "22. Monday",
    ),
    Loop(
        "code line",
        "```python\ndef greet():\n",
        "    print('hello world')\n" * 100,
        "print('hello world')",
        13,  # code-like lines are templates: a dozen copies before the cut
        "```python\ndef greet():\n    print('hello world')",
    ),
    Loop(
        "near repeat",
        "",
        "".join(f"{SORRY} {filler} " for filler in FILLERS),
        SORRY,
        3,
        f"{SORRY} Is there anything else?",
    ),
]

LEGIT = {
    "count to 20": "Sure! Here you go: " + ", ".join(str(i) for i in range(1, 21)) + ".",
    "count to 100 by lines": "\n".join(str(i) for i in range(1, 101)),
    "count in words": "one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen.",
    "spell banana": "Sure! Banana is spelled: B-A-N-A-N-A. In lowercase: b-a-n-a-n-a.",
    "spell mississippi": "M-I-S-S-I-S-S-I-P-P-I. That is M, I, S, S, I, S, S, I, P, P, I.",
    "hello five times": "hello hello hello hello hello",
    "phrase three times": "I love Python! I love Python! I love Python!",
    "ha ha ha": "Ha ha ha! That is a good one. Ha ha ha, I will remember it.",
    "birthday song": "Happy birthday to you,\nHappy birthday to you,\n"
    "Happy birthday dear Anna,\nHappy birthday to you!\n",
    "times tables": "".join(f"{a} x {b} = {a * b}\n" for a in range(1, 13) for b in range(1, 13)),
    "markdown table": (
        "| City | Country | Population | Area | Founded | Mayor | Region | Climate |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| Paris | France | 2.1M | 105 km2 | 250 BC | Hidalgo | Ile-de-France | Oceanic |\n"
        "| Rome | Italy | 2.8M | 1285 km2 | 753 BC | Gualtieri | Lazio | Mediterranean |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    ),
    "zero matrix": "[" + ",\n ".join("[" + ", ".join(["0"] * 10) + "]" for _ in range(10)) + "]",
    "ascii table": "+------+------+\n| name | age  |\n+------+------+\n| ann  | 31   |\n+------+------+\n"
    "| bob  | 27   |\n+------+------+\n| cy   | 45   |\n+------+------+\n",
    "dash line": "Results\n" + "-" * 40 + "\nAll tests passed.\n" + "=" * 40 + "\n",
    "c code": (
        "int main(void) {\n    for (int i = 0; i < n; i++) {\n        if (a[i] > max) {\n"
        "            max = a[i];\n        }\n    }\n    return max;\n}\n\n"
        "static int clamp(int x) {\n    if (x < 0) {\n        return 0;\n    }\n    return x;\n}\n"
        "int abs_val(int x) {\n    if (x < 0) {\n        return -x;\n    }\n    return x;\n}\n"
    ),
    "python code": (
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, x):\n        self.items.append(x)\n        return x\n\n"
        "    def pop(self):\n        if not self.items:\n            return None\n"
        "        return self.items.pop()\n\n    def peek(self):\n        if not self.items:\n"
        "            return None\n        return self.items[-1]\n\n"
        "    def size(self):\n        return len(self.items)\n"
    ),
    "repeated arguments": (
        "ret = lib.EVP_CipherInit_ex(\n    ctx,\n    evp_cipher,\n    ffi.NULL,\n    self._backend._ffi.NULL,\n"
        "    self._backend._ffi.NULL,\n    self._backend._ffi.NULL,\n    operation,\n)\n"
    ),
    "fenced stubs": "Here is the stub:\n\n```python\nclass Shape:\n"
    + "".join(
        f'    def {name}(self):\n        """Not implemented yet."""\n'
        '        raise NotImplementedError("Subclasses must implement this.")\n\n'
        for name in ("area", "perimeter", "name", "color")
    )
    + "```\n",
    "linear layers": "".join(f"        self.fc{i} = nn.Linear(256, 256)\n" for i in range(1, 9)),
    "json": (
        '{\n  "users": [\n    {"id": 1, "name": "Alice", "email": "alice@example.com", "active": true},\n'
        '    {"id": 2, "name": "Bob", "email": "bob@example.com", "active": false},\n'
        '    {"id": 3, "name": "Carol", "email": "carol@example.com", "active": true}\n  ],\n'
        '  "total": 3,\n  "page": {"number": 1, "size": 20}\n}\n'
    ),
    "shared prefix list": (
        "- Paris is the capital of France.\n- Rome is the capital of Italy.\n"
        "- Berlin is the capital of Germany.\n- Madrid is the capital of Spain.\n"
        "- Lisbon is the capital of Portugal.\n- Vienna is the capital of Austria.\n"
    ),
    "numbered list": "".join(
        f"{i}. {w.capitalize()}\n"
        for i, w in enumerate(
            "apple banana cherry date elderberry fig grape honeydew kiwi lemon mango nectarine orange papaya "
            "quince raspberry strawberry tangerine ugli vanilla watermelon yam zucchini almond brazil cashew "
            "durian guava lime plum".split(),
            1,
        )
    ),
    "prose": (
        "The Industrial Revolution began in Britain in the late eighteenth century. Steam engines, "
        "first used to pump water out of mines, soon powered factories, ships and railways.\n\n"
        "Cities grew quickly as people left the countryside to work in mills. Living conditions were "
        "often poor: housing was crowded, and clean water was scarce. Reformers such as Edwin Chadwick "
        "argued that sanitation would save lives, and Parliament passed the Public Health Act in 1848.\n\n"
        "By the end of the nineteenth century, industry had spread to Europe, North America and Japan. "
        "The changes reshaped work, family life and politics, and their effects are still felt today."
    ),
}


def _loop_text(case: Loop) -> str:
    return case.prefix + case.body


@pytest.mark.parametrize("case", LOOPS, ids=lambda c: c.name)
def test_loop_fires_early(case: Loop) -> None:
    verdict, fed = run(tokens(_loop_text(case)))
    assert verdict is not None
    assert fed.startswith(case.prefix)
    assert fed[len(case.prefix) :].count(case.unit) <= case.max_copies


@pytest.mark.parametrize(
    "case", [c for c in LOOPS if len(c.unit) >= 24 and c.name != "near repeat"], ids=lambda c: c.name
)
def test_long_sentences_are_cut_before_their_third_copy(case: Loop) -> None:
    _, fed = run(tokens(_loop_text(case)))
    assert fed.count(case.unit) < 3


@pytest.mark.parametrize("name", list(LEGIT))
def test_legit_repetition_never_fires(name: str) -> None:
    text = LEGIT[name]
    for pieces in (list(text), tokens(text), [text]):
        assert run(pieces)[0] is None
    assert trim_to_first_copy(text, CFG) == text


@pytest.mark.parametrize("text", [_loop_text(c) for c in LOOPS] + list(LEGIT.values()))
def test_decision_does_not_depend_on_chunking(text: str) -> None:
    rng = random.Random(len(text))
    pos, chunks = 0, []
    while pos < len(text):
        step = rng.randint(1, 40)
        chunks.append(text[pos : pos + step])
        pos += step
    verdicts = {run(pieces)[0] for pieces in (list(text), tokens(text), [text], chunks)}
    assert len(verdicts) == 1


def test_verdict_kinds() -> None:
    by_name = {c.name: run(tokens(_loop_text(c)))[0] for c in LOOPS}
    assert by_name["near repeat"] == LoopVerdict("near_repeat", len(SORRY), 3.0)
    poem = by_name["poem line"]
    assert poem is not None and poem.kind == "periodic" and poem.period_chars == len(POEM_LINE)
    assert 2 < poem.copies < 3


def test_verdict_is_sticky_and_disabled_detector_is_silent() -> None:
    det = LoopDetector(CFG)
    verdict = det.feed("Yes, I can. " * 20)
    assert verdict is not None
    assert det.feed("Something new entirely.") is verdict
    assert det.verdict is verdict
    off = LoopDetector(LoopConfig(enabled=False))
    assert off.feed("Yes, I can. " * 20) is None


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        LoopConfig(buffer_chars=1000)
    with pytest.raises(ValueError):
        LoopConfig(near_repeat_count=9)


def _prose_megabyte() -> str:
    rng = random.Random(7)
    words = [
        "river", "stone", "market", "quietly", "seven", "under", "bright", "their", "engine", "garden",
        "because", "winter", "letter", "across", "village", "number", "simple", "orange", "travel", "music",
    ]  # fmt: skip
    out, size = [], 0
    while size < 1_000_000:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 16)))
        sentence += f" {rng.randint(0, 99999)}" + rng.choice([". ", ".\n", "? ", "!\n\n"])
        out.append(sentence)
        size += len(sentence)
    return "".join(out)


def _footprint(det: LoopDetector) -> int:
    """Bytes held by the detector's own state (strings, deque and its items)."""
    total = 0
    for value in vars(det).values():
        total += sys.getsizeof(value)
        if isinstance(value, (tuple, deque)):
            total += sum(sys.getsizeof(item) for item in value)
    return total


def test_memory_stays_bounded_on_a_megabyte() -> None:
    text = _prose_megabyte()
    small = LoopDetector(CFG)
    for i in range(0, len(text), 4000):
        assert small.feed(text[i : i + 4000]) is None
    big = LoopDetector(CFG)
    assert big.feed(text) is None
    bound = 4 * (CFG.buffer_chars + 2048) * 2 + 16_384  # two buffers and a window of sentences
    assert _footprint(small) < bound
    assert _footprint(big) < bound


@pytest.mark.parametrize("case", LOOPS, ids=lambda c: c.name)
def test_has_repeated_block_sees_exact_loops(case: Loop) -> None:
    looping = has_repeated_block(_loop_text(case))
    # "22. Monday, 23. Monday" repeats only once numbers are normalised; near-repeats are not in a row
    assert looping == (case.name not in {"numbered line", "near repeat"})
    # with numbers normalised, a run of digits is one placeholder: "5555" is no longer a repeat
    normalised = has_repeated_block(_loop_text(case), normalise_numbers=True)
    assert normalised == (case.name not in {"digit run", "near repeat"})


# Three or more copies in a row, so the eval's definition counts them though the detector must not.
COPIES_IN_A_ROW = {"phrase three times", "zero matrix", "repeated arguments"}


@pytest.mark.parametrize("name", [n for n in LEGIT if n not in COPIES_IN_A_ROW])
def test_has_repeated_block_ignores_legit_repetition(name: str) -> None:
    assert not has_repeated_block(LEGIT[name])


@pytest.mark.parametrize(
    ("text", "min_copies", "expected"),
    [
        ("Let's go, team! Let's go, team! ", 2, True),
        ("Let's go, team! Let's go, team! ", 3, False),
        ("Let's go, team! Let's go, team! Let's go, team!", 3, True),
        ("Go team. Go team. Go team.", 3, False),  # a 9-char block is below the 10-char minimum
        ("hello hello hello hello hello hello hello", 3, True),  # 7 copies: a doubled block 3 times
        ("-" * 200, 3, False),
        ("|---|---|" * 30, 3, False),
        ("a b a b a b", 3, False),
    ],
)
def test_has_repeated_block_definition(text: str, min_copies: int, expected: bool) -> None:
    assert has_repeated_block(text, min_copies=min_copies) is expected


# Block near-repeats: what DRY (a line break ends its sequences) and exact periodicity both miss.
STANZA = (
    "The sea is wide and the sky is grey,\n"
    "the gulls are calling across the bay,\n"
    "the boats come home at the end of day,\n"
    "and the waves keep rolling far away.\n\n"
)
STANZA_LOOP = (
    STANZA
    + STANZA.replace("grey", "blue").replace("calling", "crying").replace("home", "back").replace("far", "so")
    + STANZA.replace("wide", "deep").replace("bay", "shore").replace("end", "close").replace("rolling", "coming")
    + STANZA.replace("sky", "sun")
)
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank"]
CYCLE_LOOP = "Here is the plan:\n" + "".join(
    f"{i + 1}. {NAMES[i % 6]} brings {2 * i + 3} cups of flour.\n" for i in range(30)
)
CHORUS = "Oh lighthouse keeper, keep your light,\nguide the sailors through the night.\n\n"
BLOCK_LEGIT = {
    "song with a chorus": "".join(
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
    "template plan": "".join(f"Week {i}: run {i + 1} km on three days\n" for i in range(1, 9)),
    "items with one word changed": "".join(
        f"- The little cat sat on the {w} mat today.\n" for w in ["red", "blue", "green", "old", "new", "soft"]
    ),
    "one cycle of names": "".join(f"{i + 1}. {n} brings {2 * i + 3} cups of flour.\n" for i, n in enumerate(NAMES)),
    "weekly table": "| Day | Open |\n|---|---|\n" + "".join(f"| {d} | yes |\n" for d in WEEK),
}


@pytest.mark.parametrize(("text", "copy"), [(STANZA_LOOP, STANZA), (CYCLE_LOOP, "1. Alice brings 3")])
def test_block_back_with_words_or_numbers_changed_is_cut_at_its_second_copy(text: str, copy: str) -> None:
    verdict, fed = run(tokens(text))
    assert verdict is not None and verdict.kind == "near_repeat"
    assert len(fed) < len(text) // 2 + len(copy)  # two copies of the block, not the whole answer
    trimmed = trim_to_first_copy(text, CFG)
    assert trimmed.count(copy.strip().split("\n")[0]) == 1
    assert trim_to_first_copy(fed, CFG) == trimmed


@pytest.mark.parametrize("name", list(BLOCK_LEGIT))
def test_choruses_refrains_and_templates_are_not_block_loops(name: str) -> None:
    text = BLOCK_LEGIT[name]
    for pieces in (list(text), tokens(text), [text]):
        assert run(pieces)[0] is None, name


@pytest.mark.parametrize("text", [STANZA_LOOP, CYCLE_LOOP, *BLOCK_LEGIT.values()])
def test_block_decision_does_not_depend_on_chunking(text: str) -> None:
    test_decision_does_not_depend_on_chunking(text)
