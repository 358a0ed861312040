"""The loop detector's skipped checkpoints change no decision, nor where it is taken."""

from __future__ import annotations

import random
import re

import pytest

from governor.stream.loop_detector import _CHECK_STEP, LoopConfig, LoopDetector, LoopVerdict

from .test_loop_detector import BLOCK_LEGIT, CFG, CYCLE_LOOP, LEGIT, LOOPS, STANZA_LOOP, _loop_text, tokens


class EveryCheckpoint(LoopDetector):
    """The detector without its shortcuts: every checkpoint checked in full, the reference for skipping."""

    def __init__(self, config: LoopConfig) -> None:
        super().__init__(config)
        self.checks = 0

    def _next_checkpoint(self, after: int) -> int:
        return after - after % _CHECK_STEP + _CHECK_STEP

    def _exact_ruled_out(self, at: int) -> bool:
        return False

    def _varying_ruled_out(self, at: int) -> bool:
        return False

    def _check(self, at: int) -> None:
        self.checks += 1
        super()._check(at)


class Counted(LoopDetector):
    def __init__(self, config: LoopConfig) -> None:
        super().__init__(config)
        self.checks = 0

    def _check(self, at: int) -> None:
        self.checks += 1
        super()._check(at)


def _near_threshold_texts() -> list[str]:
    """Loops of every size that stop right after a copy or part of one, then text that does not repeat,
    some with numbers that change: where skipping a checkpoint could miss a run or fire at another place."""
    rng = random.Random(16)
    words = [*"river stone maple the a of and to in is it 7 12 2024 x=1 f(x) - * : , . !".split(), "\n"]

    def phrase(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    texts = []
    for _ in range(120):
        unit = phrase(rng.randint(1, 30)) + rng.choice([" ", "\n", ". "])
        copies = "".join(re.sub(r"\d+", str(rng.randint(0, 99)), unit) if rng.random() < 0.3 else unit
                         for _ in range(rng.randint(2, 7)))  # fmt: skip
        texts.append(phrase(rng.randint(0, 40)) + " " + copies + unit[: rng.randint(0, len(unit))] + phrase(60))
    return texts


# the `balanced` and `strict` presets' loop settings
PRESET_CFGS = [
    CFG,
    LoopConfig(min_sentence_chars=40, phrase_span_chars=128, symbol_span_chars=160, near_repeat_count=4,
               near_repeat_window=12),
    LoopConfig(min_sentence_chars=16, phrase_span_chars=40, symbol_span_chars=128, near_repeat_count=3,
               near_repeat_window=16),
]  # fmt: skip


def _first_fire(det: LoopDetector, pieces: list[str]) -> tuple[int, LoopVerdict, tuple[str, int] | None] | None:
    for i, piece in enumerate(pieces):
        if det.feed(piece) is not None:
            return i, det.verdict, det.cut  # type: ignore[return-value]
    return None


@pytest.mark.parametrize("config", PRESET_CFGS, ids=["default", "balanced", "strict"])
def test_skipped_checkpoints_change_no_decision_nor_where_it_is_taken(config: LoopConfig) -> None:
    texts = [_loop_text(c) for c in LOOPS] + [*LEGIT.values(), STANZA_LOOP, CYCLE_LOOP, *BLOCK_LEGIT.values()]
    texts += _near_threshold_texts()
    fired = 0
    for text in texts:
        for pieces in ([text], tokens(text)):
            expected = _first_fire(EveryCheckpoint(config), pieces)
            assert _first_fire(LoopDetector(config), pieces) == expected, text[:80]
            fired += expected is not None
    assert len(texts) // 4 < fired < 2 * len(texts)  # the texts exercise firing as well as not firing


def test_most_checkpoints_are_skipped_in_text_that_does_not_repeat() -> None:
    rng = random.Random(3)
    text = LEGIT["prose"] + " ".join(rng.choice(LEGIT["prose"].split()) for _ in range(600))
    every, skipping = EveryCheckpoint(CFG), Counted(CFG)
    assert every.feed(text) is None and skipping.feed(text) is None
    assert skipping.checks < every.checks / 2
