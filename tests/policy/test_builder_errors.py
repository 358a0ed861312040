"""The policy builder refuses bad presets, fields, stops and profiles with a message naming the param."""

from __future__ import annotations

from typing import Any

import pytest

from governor.errors import InvalidRequest
from governor.policy.builder import Policy
from governor.policy.presets import (
    Preset,
    PresetError,
    builtin_presets,
)
from governor.policy.tokenizer_info import TokenizerInfo

from .test_builder import BALANCED_NEAR_WINDOW, CHAT, COMPLETION, _policy


def test_unknown_preset(policy: Policy) -> None:
    with pytest.raises(InvalidRequest) as err:
        policy.build({**CHAT, "decoding_preset": "turbo"}, kind="chat")
    assert err.value.param == "decoding_preset"
    assert all(name in err.value.message for name in ("off", "balanced", "strict"))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"decoding_preset": 3}, "decoding_preset"),
        ({"dry_multiplier": -1}, "dry_multiplier"),
        ({"dry_multiplier": "0.8"}, "dry_multiplier"),
        ({"dry_base": 0.5}, "dry_base"),
        ({"dry_allowed_length": 0}, "dry_allowed_length"),
        ({"dry_allowed_length": 2.5}, "dry_allowed_length"),
        ({"dry_range": -1}, "dry_range"),
        ({"dry_range": 5000}, "dry_range"),
        ({"dry_breakers": "\n"}, "dry_breakers"),
        ({"dry_breakers": [""]}, "dry_breakers"),
        ({"dry_breakers": ["x"] * 33}, "dry_breakers"),
        ({"ngram_size": -1}, "ngram_size"),
        ({"ngram_size": 33}, "ngram_size"),
        ({"ngram_size": True}, "ngram_size"),
        ({"ngram_window": -5}, "ngram_window"),
        ({"ngram_size": 3, "ngram_window": 4097}, "ngram_window"),
        ({"rep_penalty": 0.9}, "rep_penalty"),
        ({"rep_penalty": 3.5}, "rep_penalty"),
        ({"rep_window": 10**6}, "rep_window"),
        ({"rep_scope": "prompt"}, "rep_scope"),
        ({"rep_exempt": [-1]}, "rep_exempt"),
        ({"rep_exempt": [49152]}, "rep_exempt"),
        ({"rep_exempt": "1,2"}, "rep_exempt"),
        ({"rep_exempt": list(range(4097))}, "rep_exempt"),
        ({"rep_exempt_digits_punct": "yes"}, "rep_exempt_digits_punct"),
        ({"loop_detection": 1}, "loop_detection"),
        ({"loop_near_repeat_count": 1}, "loop_near_repeat_count"),
        ({"loop_near_repeat_count": BALANCED_NEAR_WINDOW + 1}, "loop_near_repeat_count"),
        ({"loop_max_period_chars": 4000}, "loop_max_period_chars"),
        ({"loop_buffer_chars": 1000}, "loop_buffer_chars"),
    ],
)
def test_bad_fields_name_the_param(policy: Policy, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        policy.build({**COMPLETION, **fields}, kind="completions")
    assert err.value.param == param
    assert err.value.status == 400


def test_bad_stop_types() -> None:
    with pytest.raises(InvalidRequest) as err:
        _policy().build({**COMPLETION, "stop": 3}, kind="completions")
    assert err.value.param == "stop"
    with pytest.raises(InvalidRequest) as err:
        _policy().build({**COMPLETION, "stop": ["a", None]}, kind="completions")
    assert err.value.param == "stop"


def test_bad_stop_token_ids(policy: Policy) -> None:
    with pytest.raises(InvalidRequest) as err:
        policy.build({**COMPLETION, "stop_token_ids": "2"}, kind="completions")
    assert err.value.param == "stop_token_ids"


@pytest.mark.parametrize(
    ("profile", "needle"),
    [
        ({"template": "klingon"}, "template"),
        ({"template": 3}, "template"),
        ({"preset": "turbo"}, "preset"),
        ({"stop": [1]}, "stop"),
        ({"stop": ["x"] * 33}, "stop"),
        ({"dry_multiplier": -1}, "dry_multiplier"),
        ({"dry_multipler": 1}, "dry_multipler"),
        ({"rep_exempt": [10**6]}, "rep_exempt"),
        ({"loop_near_repeat_count": BALANCED_NEAR_WINDOW + 1}, "near_repeat"),
    ],
)
def test_bad_profiles(policy: Policy, profile: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        policy.build(dict(CHAT), kind="chat", profile=profile)
    assert err.value.param == "model"
    assert needle in err.value.message and "governor.json" in err.value.message
    with pytest.raises(InvalidRequest):
        policy.validate_profile(profile)


def test_startup_errors(smol: TokenizerInfo) -> None:
    with pytest.raises(PresetError, match="default preset 'turbo'"):
        Policy(builtin_presets(), "turbo", smol, 4096, 16)
    with pytest.raises(PresetError, match=r"model profile.*template"):
        Policy(builtin_presets(), "balanced", smol, 4096, 16, model_profile={"template": "klingon"})
    presets = {**builtin_presets(), "wide": Preset(rep_penalty=1.1, rep_exempt=[60000])}
    with pytest.raises(PresetError, match=r"preset 'wide'.*vocabulary"):
        Policy(presets, "balanced", smol, 4096, 16)
