"""Behaviour shared by all three processors: zero cost when unused, row moves, validation."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from vllm import SamplingParams

from governor.processors.dry import DRYLogitsProcessor
from governor.processors.extra_args import encode_ids, parse_ids
from governor.processors.ngram import NoRepeatNGramLogitsProcessor
from governor.processors.window_penalty import WindowedRepetitionPenaltyLogitsProcessor

from .harness import BatchSim, make_processor

VOCAB = 16
PROCESSORS = [DRYLogitsProcessor, NoRepeatNGramLogitsProcessor, WindowedRepetitionPenaltyLogitsProcessor]
# One request per processor that makes it do something on the output [1, 2, 3, 1, 2].
ACTIVE_ARGS: dict[type, dict[str, Any]] = {
    DRYLogitsProcessor: {"gov_dry_multiplier": 1.0},
    NoRepeatNGramLogitsProcessor: {"gov_ngram_size": 3},
    WindowedRepetitionPenaltyLogitsProcessor: {"gov_rep_penalty": 2.0},
}
OFF_ARGS = [None, {}, {"gov_dry_multiplier": 0}, {"gov_ngram_size": 0}, {"gov_rep_penalty": 1.0}, {"other": "x"}]


class CountTorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", PROCESSORS)
def test_unused_processor_returns_logits_untouched_without_tensor_ops(cls: type) -> None:
    sim = BatchSim(make_processor(cls, VOCAB), batch_size=len(OFF_ARGS))
    for index, args in enumerate(OFF_ARGS):
        sim.add(index, args, [1, 2, 3, 1, 2], [1, 2, 3, 1, 2])
    sim.flush()
    sim.flush()  # a step with no batch change
    logits = torch.randn(len(OFF_ARGS), VOCAB)
    before = logits.clone()
    with CountTorchCalls() as counter:
        result = sim.processor.apply(logits)
    assert result is logits
    assert counter.calls == 0
    assert torch.equal(logits, before)
    assert sim.processor.is_argmax_invariant() is False


@pytest.mark.parametrize("cls", PROCESSORS)
def test_inactive_rows_next_to_active_ones_are_untouched(cls: type) -> None:
    sim = BatchSim(make_processor(cls, VOCAB), batch_size=3)
    sim.add(0, None, [], [1, 2, 3, 1, 2])
    sim.add(1, ACTIVE_ARGS[cls], [], [1, 2, 3, 1, 2])
    sim.add(2, {"gov_unrelated": 1}, [], [1, 2, 3, 1, 2])
    sim.flush()
    logits = torch.ones(3, VOCAB)
    sim.processor.apply(logits)
    assert torch.equal(logits[0], torch.ones(VOCAB)) and torch.equal(logits[2], torch.ones(VOCAB))
    assert not torch.equal(logits[1], torch.ones(VOCAB))


@pytest.mark.parametrize("cls", PROCESSORS)
def test_rows_follow_swaps_and_moves(cls: type) -> None:
    sim = BatchSim(make_processor(cls, VOCAB), batch_size=4)
    sim.add(0, ACTIVE_ARGS[cls], [], [1, 2, 3, 1, 2])
    sim.add(1, None, [], [1, 2, 3, 1, 2])
    sim.flush()
    sim.swap(0, 1)
    sim.flush()
    logits = torch.ones(4, VOCAB)
    sim.processor.apply(logits)
    assert torch.equal(logits[0], torch.ones(VOCAB)) and not torch.equal(logits[1], torch.ones(VOCAB))
    sim.move(1, 3)
    sim.flush()
    logits = torch.ones(4, VOCAB)
    sim.processor.apply(logits)
    assert torch.equal(logits[:3], torch.ones(3, VOCAB)) and not torch.equal(logits[3], torch.ones(VOCAB))
    sim.remove(3)
    sim.flush()
    logits = torch.ones(4, VOCAB)
    assert sim.processor.apply(logits) is logits
    assert torch.equal(logits, torch.ones(4, VOCAB)) and not sim.processor.rows


VALID = {
    "gov_dry_multiplier": 0.8,
    "gov_dry_base": 1.75,
    "gov_dry_allowed_length": 2,
    "gov_dry_range": 0,
    "gov_dry_breakers": "0,13",
    "gov_dry_scope": "output",
    "gov_ngram_size": 3,
    "gov_ngram_window": 3.0,
    "gov_rep_penalty": 1.2,
    "gov_rep_window": 64,
    "gov_rep_scope": "all",
    "gov_rep_exempt": "",
}


@pytest.mark.parametrize("cls", PROCESSORS)
@pytest.mark.parametrize("extra_args", [None, {}, VALID])
def test_valid_params_pass(cls: type, extra_args: dict[str, Any] | None) -> None:
    cls.validate_params(SamplingParams(extra_args=extra_args))


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (DRYLogitsProcessor, "gov_dry_multiplier", -1.0),
        (DRYLogitsProcessor, "gov_dry_multiplier", "1.0"),
        (DRYLogitsProcessor, "gov_dry_multiplier", float("nan")),
        (DRYLogitsProcessor, "gov_dry_base", 0.5),
        (DRYLogitsProcessor, "gov_dry_base", True),
        (DRYLogitsProcessor, "gov_dry_allowed_length", 0),
        (DRYLogitsProcessor, "gov_dry_allowed_length", 1.5),
        (DRYLogitsProcessor, "gov_dry_range", -3),
        (DRYLogitsProcessor, "gov_dry_breakers", 5),
        (DRYLogitsProcessor, "gov_dry_breakers", "1,-2"),
        (DRYLogitsProcessor, "gov_dry_breakers", "a"),
        (DRYLogitsProcessor, "gov_dry_breakers", "1,,2"),
        (DRYLogitsProcessor, "gov_dry_breakers", [1, 2]),
        (DRYLogitsProcessor, "gov_dry_scope", "prompt"),  # the old list form: 0.25 completions refuses it
        (NoRepeatNGramLogitsProcessor, "gov_ngram_size", -1),
        (NoRepeatNGramLogitsProcessor, "gov_ngram_size", "3"),
        (NoRepeatNGramLogitsProcessor, "gov_ngram_window", -1),
        (WindowedRepetitionPenaltyLogitsProcessor, "gov_rep_penalty", 0.9),
        (WindowedRepetitionPenaltyLogitsProcessor, "gov_rep_penalty", float("inf")),
        (WindowedRepetitionPenaltyLogitsProcessor, "gov_rep_window", -5),
        (WindowedRepetitionPenaltyLogitsProcessor, "gov_rep_scope", "prompt"),
        (WindowedRepetitionPenaltyLogitsProcessor, "gov_rep_exempt", [3]),
        (WindowedRepetitionPenaltyLogitsProcessor, "gov_rep_exempt", "1, 2"),
        (WindowedRepetitionPenaltyLogitsProcessor, "gov_rep_exempt", "1,2,"),
        (WindowedRepetitionPenaltyLogitsProcessor, "gov_rep_exempt", "+3"),
        (WindowedRepetitionPenaltyLogitsProcessor, "gov_rep_exempt", True),
    ],
)
def test_invalid_params_name_the_field(cls: type, key: str, value: Any) -> None:
    # Checked even when the processor is otherwise off, so a typo'd value never passes silently.
    with pytest.raises(ValueError, match=f"^{key}: "):
        cls.validate_params(SamplingParams(extra_args={key: value}))
    with pytest.raises(ValueError, match=f"^{key}: "):
        cls.validate_params(SamplingParams(extra_args={**VALID, key: value}))


@pytest.mark.parametrize("ids", [[], [0], [198, 25, 7], list(range(0, 50000, 997))])
def test_token_ids_round_trip_as_one_string(ids: list[int]) -> None:
    encoded = encode_ids(ids)
    assert isinstance(encoded, str)
    assert parse_ids(encoded, "k") == frozenset(ids)


def test_token_ids_none_and_empty_mean_none() -> None:
    assert parse_ids(None, "k") == parse_ids("", "k") == frozenset()


def test_extra_args_module_imports_without_torch_or_vllm() -> None:
    code = "import sys, governor.processors.extra_args; print(sorted({'torch', 'vllm'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_vllm_loads_the_processors_by_the_names_the_engine_flags_use() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import _load_custom_logitsprocs, validate_logits_processors_parameters

    from governor.engine.flags import PROCESSORS as FQCNS
    from governor.engine.flags import SEPARATE_PROCESSORS
    from governor.processors.governor import GovernorLogitsProcessor

    assert _load_custom_logitsprocs(tuple(FQCNS)) == [GovernorLogitsProcessor]
    assert _load_custom_logitsprocs(tuple(SEPARATE_PROCESSORS)) == PROCESSORS
    validate_logits_processors_parameters(tuple(FQCNS), SamplingParams(extra_args=VALID))
    # 0.32 wraps the processor's ValueError in VLLMValidationError, 0.25 passes it on; both answer 400.
    with pytest.raises((VLLMValidationError, ValueError), match="gov_rep_scope"):
        validate_logits_processors_parameters(tuple(FQCNS), SamplingParams(extra_args={"gov_rep_scope": "x"}))
