from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest

from governor.errors import InvalidRequest
from governor.policy.builder import ENGINE_HOOKS, GOVERNOR_FIELDS, Policy
from governor.policy.presets import (
    BUILTIN_PRESETS,
    CONTROL_FIELDS,
    LOOP_FIELDS,
    builtin_presets,
    parse_presets,
)
from governor.policy.tokenizer_info import TokenizerInfo
from governor.processors import extra_args as xa
from governor.stream.loop_detector import LoopConfig

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "### Instruction:\nhi\n\n### Response:\n"}
ALPACA_STOPS = ["\n### Instruction:", "\n### Input:", "\n### Response:"]
DRY = set(xa.DRY_KEYS)
NGRAM = set(xa.NGRAM_KEYS)
REP = set(xa.REP_KEYS)
# Expected values come from the built-in table, so retuning a preset does not break these tests.
BALANCED = BUILTIN_PRESETS["balanced"]
STRICT = BUILTIN_PRESETS["strict"]
MAX_MODEL_LEN = 4096  # what the `policy` fixtures serve
# A near-repeat count above the default preset's window is inconsistent with it.
BALANCED_NEAR_WINDOW: int = BALANCED.get("loop_near_repeat_window", LoopConfig().near_repeat_window)


def _loop_of(fields: Mapping[str, Any]) -> LoopConfig | None:
    """The loop detector settings a preset's fields stand for (None = off)."""
    if not fields.get("loop_detection"):
        return None
    return LoopConfig(**{attr: fields[key] for key, attr in LOOP_FIELDS.items() if key in fields})


def _xarg_keys(fields: Mapping[str, Any]) -> set[str]:
    """The processor args a preset's enabled controls send, for a tokenizer that knows its tokens."""
    keys: set[str] = set()
    if fields.get("dry_multiplier", 0) > 0:
        keys |= DRY if fields.get("dry_breakers") else DRY - {xa.DRY_BREAKERS}
    if fields.get("ngram_size", 0) > 0:
        keys |= NGRAM
    if fields.get("rep_penalty", 1.0) > 1.0:
        exempt = fields.get("rep_exempt") or fields.get("rep_exempt_digits_punct")
        keys |= REP if exempt else REP - {xa.REP_EXEMPT}
    return keys


def _window(fields: Mapping[str, Any], key: str) -> int:
    """A preset's window as sent: one beyond the context means everything (0)."""
    value = fields.get(key, 0)
    return 0 if value > MAX_MODEL_LEN else value


def _chatml_info(vocab: int = 1000) -> TokenizerInfo:
    """A ChatML model whose turn markers are plain text (no special tokens known)."""
    return TokenizerInfo(vocab_size=vocab, chat_template="<|im_start|>{{ m }}<|im_end|>")


def _policy(info: TokenizerInfo | None = None, **kwargs: Any) -> Policy:
    return Policy(
        builtin_presets(),
        kwargs.pop("default", "balanced"),
        info or _chatml_info(),
        kwargs.pop("max_model_len", MAX_MODEL_LEN),
        kwargs.pop("max_stop", 16),
        **kwargs,
    )


# -- presets → vllm_xargs ------------------------------------------------------------------------


def test_balanced_default(policy: Policy, smol: TokenizerInfo) -> None:
    result = policy.build(dict(CHAT), kind="chat")
    assert result.preset == "balanced"
    assert result.loop is not None and result.loop == _loop_of(BALANCED)
    xargs = result.body["vllm_xargs"]
    assert set(xargs) == _xarg_keys(BALANCED)
    assert xargs[xa.DRY_MULTIPLIER] == BALANCED["dry_multiplier"]
    assert xargs[xa.DRY_ALLOWED_LENGTH] == BALANCED["dry_allowed_length"]
    assert smol.special_id("<|im_end|>") not in xa.parse_ids(xargs[xa.DRY_BREAKERS], "")
    assert xargs[xa.DRY_SCOPE] == "output"  # copying from the prompt is free (docs/decoding.md, "dry_scope")
    assert "stop" not in result.body and "stop_token_ids" not in result.body  # chat: vLLM stops at EOS
    assert "repetition_penalty" not in result.body


def test_a_request_puts_the_prompt_back_in_drys_context(policy: Policy) -> None:
    result = policy.build({**CHAT, "dry_scope": "all"}, kind="chat")
    assert result.body["vllm_xargs"][xa.DRY_SCOPE] == "all"
    assert policy.build({**CHAT, "decoding_preset": "strict"}, kind="chat").body["vllm_xargs"][xa.DRY_SCOPE] == "all"


def test_off_sends_nothing(policy: Policy) -> None:
    body = {**CHAT, "decoding_preset": "off"}
    result = policy.build(body, kind="chat")
    assert result.body == CHAT
    assert result.loop is None and result.preset == "off"


def test_strict(policy: Policy, smol: TokenizerInfo) -> None:
    result = policy.build({**CHAT, "decoding_preset": "strict"}, kind="chat")
    xargs = result.body["vllm_xargs"]
    assert set(xargs) == DRY | NGRAM | REP == _xarg_keys(STRICT)
    assert xargs[xa.NGRAM_SIZE] == STRICT["ngram_size"]
    assert xargs[xa.NGRAM_WINDOW] == _window(STRICT, "ngram_window")
    assert xargs[xa.REP_PENALTY] == STRICT["rep_penalty"] and xargs[xa.REP_WINDOW] == _window(STRICT, "rep_window")
    assert xargs[xa.REP_SCOPE] == STRICT.get("rep_scope", "output")
    assert set(smol.digit_punct_ids) <= xa.parse_ids(xargs[xa.REP_EXEMPT], "")
    assert result.loop is not None and result.loop == _loop_of(STRICT)
    balanced_loop = policy.build(dict(CHAT), kind="chat").loop
    assert balanced_loop is not None and result.loop.min_sentence_chars <= balanced_loop.min_sentence_chars


def test_xargs_hold_only_enabled_controls(policy: Policy) -> None:
    xargs = policy.build({**CHAT, "dry_multiplier": 0}, kind="chat").body.get("vllm_xargs", {})
    assert set(xargs) == _xarg_keys({**BALANCED, "dry_multiplier": 0}) and not DRY & set(xargs)
    body = policy.build({**CHAT, "dry_multiplier": 0, "ngram_size": 0, "rep_penalty": 1.0}, kind="chat").body
    assert "vllm_xargs" not in body
    xargs = policy.build({**CHAT, "decoding_preset": "off", "ngram_size": 3}, kind="chat").body["vllm_xargs"]
    assert xargs == {xa.NGRAM_SIZE: 3, xa.NGRAM_WINDOW: 0}
    xargs = policy.build({**CHAT, "decoding_preset": "off", "rep_penalty": 1.2}, kind="chat").body["vllm_xargs"]
    assert xargs == {xa.REP_PENALTY: 1.2, xa.REP_WINDOW: 0, xa.REP_SCOPE: "output"}
    assert set(xargs) <= xa.ALL_KEYS


def test_xargs_parse_with_the_processors_parsers(policy: Policy) -> None:
    xargs = policy.build({**CHAT, "decoding_preset": "strict"}, kind="chat").body["vllm_xargs"]
    dry, ngram, rep = xa.parse_dry(xargs), xa.parse_ngram(xargs), xa.parse_rep_penalty(xargs)
    assert dry is not None and ngram is not None and rep is not None
    assert dry.breakers and rep.exempt and not rep.include_prompt


def test_request_overrides(policy: Policy) -> None:
    dry = STRICT["dry_multiplier"] / 2  # differs from the preset's
    result = policy.build(
        {**CHAT, "decoding_preset": "strict", "dry_multiplier": dry, "loop_detection": False}, kind="chat"
    )
    assert result.body["vllm_xargs"][xa.DRY_MULTIPLIER] == dry
    assert result.body["vllm_xargs"][xa.NGRAM_SIZE] == STRICT["ngram_size"]
    assert result.loop is None and result.preset == "strict"
    window = BALANCED_NEAR_WINDOW + 1  # differs from the preset's; the rest of its loop settings stay
    loop = policy.build({**CHAT, "loop_near_repeat_window": window}, kind="chat").loop
    balanced_loop = _loop_of(BALANCED)
    assert balanced_loop is not None and balanced_loop.near_repeat_window != window
    assert loop == dataclasses.replace(balanced_loop, near_repeat_window=window)


def test_governor_fields_are_stripped_and_body_is_a_copy(policy: Policy) -> None:
    body = {**CHAT, "decoding_preset": "balanced", "dry_base": 2.0, "ngram_window": None, "temperature": 0.3}
    before = dict(body)
    out = policy.build(body, kind="chat").body
    assert body == before
    assert not GOVERNOR_FIELDS & set(out)
    assert out["temperature"] == 0.3 and out["messages"] is body["messages"]
    assert {"decoding_preset", "dry_multiplier", "loop_detection"} <= GOVERNOR_FIELDS
    assert CONTROL_FIELDS <= GOVERNOR_FIELDS


def test_engine_hooks_are_never_copied(policy: Policy) -> None:
    hooks = {
        "vllm_xargs": {"gov_dry_multiplier": 9},
        "logits_processors": ["x"],
        "chat_template": "{{x}}",
        "chat_template_kwargs": {"a": 1},
    }
    assert set(hooks) == ENGINE_HOOKS
    out = policy.build({**CHAT, **hooks}, kind="chat").body
    assert out["vllm_xargs"][xa.DRY_MULTIPLIER] == BALANCED["dry_multiplier"] != 9
    assert out["vllm_xargs"] == policy.build(dict(CHAT), kind="chat").body["vllm_xargs"]
    assert not {"logits_processors", "chat_template", "chat_template_kwargs"} & set(out)
    out = policy.build({**CHAT, **hooks, "decoding_preset": "off"}, kind="chat").body
    assert not ENGINE_HOOKS & set(out)


def test_operator_allowed_engine_field_is_kept() -> None:
    policy = _policy(allow_engine_fields=["chat_template", "vllm_xargs"])
    out = policy.build({**CHAT, "chat_template": "{{x}}", "vllm_xargs": {"session_id": "a"}}, kind="chat").body
    assert out["chat_template"] == "{{x}}"
    assert out["vllm_xargs"]["session_id"] == "a" and xa.DRY_MULTIPLIER in out["vllm_xargs"]


# -- stops ---------------------------------------------------------------------------------------


def test_completions_get_the_models_template_stops() -> None:
    out = _policy().build(dict(COMPLETION), kind="completions").body
    assert out["stop"] == ["<|im_end|>", "<|im_start|>"]


def test_ignore_eos_leaves_out_the_template_stops_but_keeps_the_clients(policy: Policy) -> None:
    out = policy.build({**COMPLETION, "ignore_eos": True}, kind="completions").body
    assert "stop" not in out and "stop_token_ids" not in out
    out = policy.build({**COMPLETION, "ignore_eos": True, "stop": ["END"], "stop_token_ids": [7]},
                       kind="completions").body  # fmt: skip
    assert out["stop"] == ["END"] and out["stop_token_ids"] == [7]


def test_special_token_stops_become_stop_token_ids(policy: Policy) -> None:
    out = policy.build({**COMPLETION, "stop": ["END"], "stop_token_ids": [7]}, kind="completions").body
    assert out["stop"] == ["END"]
    assert out["stop_token_ids"] == [7, 2, 1]


def test_request_stop_is_kept_and_merged() -> None:
    policy = _policy()
    out = policy.build({**COMPLETION, "stop": "END"}, kind="completions").body
    assert out["stop"] == ["END", "<|im_end|>", "<|im_start|>"]
    out = policy.build({**COMPLETION, "stop": ["<|im_end|>", "END", "END"]}, kind="completions").body
    assert out["stop"] == ["<|im_end|>", "END", "<|im_start|>"]
    out = policy.build({**CHAT, "stop": "END"}, kind="chat").body
    assert out["stop"] == "END"  # nothing to add: left exactly as sent


def test_stop_limit_counts_template_stops() -> None:
    policy = _policy(max_stop=4)
    policy.build({**COMPLETION, "stop": ["a", "b"]}, kind="completions")
    policy.build({**COMPLETION, "stop": ["a", "b", "<|im_end|>"]}, kind="completions")  # dedup: 4 in all
    with pytest.raises(InvalidRequest) as err:
        policy.build({**COMPLETION, "stop": ["a", "b", "c"]}, kind="completions")
    assert err.value.param == "stop" and "at most 2" in err.value.message
    tight = _policy(max_stop=0)  # template stops alone exceed the limit: still served
    assert tight.build(dict(COMPLETION), kind="completions").body["stop"] == ["<|im_end|>", "<|im_start|>"]


def test_profile_template_alpaca_adds_stops_to_chat_and_completions(policy: Policy) -> None:
    profile = {"template": "alpaca", "stop": ["<END>"]}
    for kind, body in (("chat", CHAT), ("completions", COMPLETION)):
        out = policy.build({**body, "stop": "x"}, kind=kind, profile=profile).body  # type: ignore[arg-type]
        assert out["stop"] == ["x", *ALPACA_STOPS, "<END>"]
        assert "stop_token_ids" not in out


def test_profile_naming_the_models_own_template_applies_to_chat(policy: Policy) -> None:
    out = policy.build(dict(CHAT), kind="chat", profile={"template": "chatml"}).body
    assert out["stop_token_ids"] == [2, 1]


def test_model_profile_template_differing_from_detection_applies_to_chat() -> None:
    policy = _policy(model_profile={"template": "vicuna"})
    assert policy.family.name == "vicuna"
    assert policy.build(dict(CHAT), kind="chat").body["stop"] == ["\nUSER:"]


def test_plain_model_has_no_template_stops(generic_policy: Policy) -> None:
    out = generic_policy.build(dict(COMPLETION), kind="completions").body
    assert "stop" not in out and "stop_token_ids" not in out


# -- layering ------------------------------------------------------------------------------------


def test_layers_apply_in_order() -> None:
    policy = _policy(model_profile={"dry_multiplier": 0.5, "dry_allowed_length": 5, "repetition_penalty": 1.02})
    out = policy.build({**CHAT, "dry_base": 2.0}, kind="chat", profile={"dry_allowed_length": 4}).body
    xargs = out["vllm_xargs"]
    assert (xargs[xa.DRY_MULTIPLIER], xargs[xa.DRY_ALLOWED_LENGTH], xargs[xa.DRY_BASE]) == (0.5, 4, 2.0)
    assert out["repetition_penalty"] == 1.02


def test_a_layer_naming_a_preset_starts_over() -> None:
    model_dry = STRICT["dry_multiplier"] / 2  # differs from strict's
    policy = _policy(model_profile={"preset": "strict", "dry_multiplier": model_dry})
    result = policy.build(dict(CHAT), kind="chat")
    assert result.preset == "strict" and result.body["vllm_xargs"][xa.DRY_MULTIPLIER] == model_dry
    assert result.body["vllm_xargs"][xa.NGRAM_SIZE] == STRICT["ngram_size"]
    result = policy.build(dict(CHAT), kind="chat", profile={"preset": "off"})
    assert result.preset == "off" and "vllm_xargs" not in result.body and result.loop is None
    profile_dry = BALANCED["dry_multiplier"] / 2  # differs from balanced's
    result = policy.build(
        {**CHAT, "decoding_preset": "balanced"},
        kind="chat",
        profile={"dry_multiplier": profile_dry, "template": "alpaca"},
    )
    assert result.body["vllm_xargs"][xa.DRY_MULTIPLIER] == BALANCED["dry_multiplier"]  # profile fields dropped...
    assert result.loop == _loop_of(BALANCED)
    assert result.body["stop"] == ALPACA_STOPS  # ...its template kept


def test_preset_passthrough_fields_fill_only_unset_fields() -> None:
    presets = parse_presets(
        {"gentle": {"repetition_penalty": 1.05, "repetition_detection": {"max_pattern_size": 8, "min_count": 4}}}
    )
    policy = Policy(presets, "gentle", _chatml_info(), 4096, 16)
    out = policy.build(dict(CHAT), kind="chat").body
    assert out["repetition_penalty"] == 1.05
    assert out["repetition_detection"] == {"max_pattern_size": 8, "min_pattern_size": 0, "min_count": 4}
    out["repetition_detection"]["min_count"] = 99  # the cached default is not shared
    assert policy.build(dict(CHAT), kind="chat").body["repetition_detection"]["min_count"] == 4
    assert policy.build({**CHAT, "repetition_penalty": 1.3}, kind="chat").body["repetition_penalty"] == 1.3


def test_same_profile_content_is_resolved_once(policy: Policy) -> None:
    a = policy.build(dict(CHAT), kind="chat", profile={"template": "alpaca", "stop": ["x"]})
    b = policy.build(dict(CHAT), kind="chat", profile={"stop": ["x"], "template": "alpaca"})
    assert a.body["vllm_xargs"][xa.DRY_BREAKERS] is b.body["vllm_xargs"][xa.DRY_BREAKERS]
    assert a.body["stop"] == b.body["stop"]


def test_windows_clamp_for_presets_and_fail_for_requests() -> None:
    max_model_len = BALANCED["dry_range"] - 1
    policy = _policy(max_model_len=max_model_len)
    assert policy.build(dict(CHAT), kind="chat").body["vllm_xargs"][xa.DRY_RANGE] == 0  # range > context: all
    with pytest.raises(InvalidRequest) as err:
        policy.build({**CHAT, "dry_range": max_model_len + 1}, kind="chat")
    assert err.value.param == "dry_range"


def test_generic_tokenizer_skips_token_lists(generic_policy: Policy) -> None:
    xargs = generic_policy.build({**CHAT, "decoding_preset": "strict"}, kind="chat").body["vllm_xargs"]
    assert xa.DRY_BREAKERS not in xargs and xa.REP_EXEMPT not in xargs
    xargs = generic_policy.build({**CHAT, "rep_penalty": 1.1, "rep_exempt": [10**6]}, kind="chat").body["vllm_xargs"]
    assert xargs[xa.REP_EXEMPT] == "1000000"  # vocabulary unknown: not checked


# -- errors --------------------------------------------------------------------------------------
