"""The typed requests: what the openai client sends is accepted, everything else bounded or refused."""

from __future__ import annotations

import inspect
from typing import Any

import openai
import pytest

from governor.errors import InvalidRequest
from governor.serving.request import DROPPED, REFUSED, ChatCompletionRequest, CompletionRequest, parse_request
from governor.settings import Settings

SETTINGS = Settings()
MESSAGES = [{"role": "user", "content": "hi"}]
# One plausible value for every parameter of the openai client's create() (chat and completions).
SAMPLES: dict[str, Any] = {
    "messages": MESSAGES, "model": "m", "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.1,
    "function_call": "auto", "functions": [{"name": "f", "parameters": {}}], "logit_bias": {"50256": -100},
    "logprobs": True, "max_completion_tokens": 5, "max_tokens": 5, "metadata": {"k": "v"}, "modalities": ["text"],
    "n": 2, "parallel_tool_calls": True, "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.2,
    "prompt_cache_key": "p", "prompt_cache_retention": "24h", "prompt_cache_options": {"a": 1},
    "reasoning_effort": "low", "response_format": {"type": "json_object"}, "safety_identifier": "s", "seed": 7,
    "service_tier": "auto", "stop": ["\n"], "store": False, "stream": True,
    "stream_options": {"include_usage": True, "include_obfuscation": False}, "temperature": 0.5,
    "tool_choice": "auto", "verbosity": "low", "moderation": {"a": 1},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "top_logprobs": 2,
    "top_p": 0.9, "user": "u", "web_search_options": {}, "prompt": "hello", "best_of": 2, "echo": False,
    "suffix": "end",
}  # fmt: skip
_NOT_BODY = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}


def _create_params(resource: Any) -> set[str]:
    return set(inspect.signature(resource.create).parameters) - _NOT_BODY


@pytest.mark.parametrize(
    ("kind", "resource"),
    [
        ("chat", openai.resources.chat.completions.Completions),
        ("completions", openai.resources.completions.Completions),
    ],
)
def test_every_openai_client_parameter_is_accepted(kind: str, resource: Any) -> None:
    params = _create_params(resource)
    assert params <= set(SAMPLES), f"new openai parameters to decide on: {params - set(SAMPLES)}"
    body = {name: SAMPLES[name] for name in params}
    if kind == "completions":
        body["logprobs"] = 2
    req = parse_request(kind, body, SETTINGS)  # type: ignore[arg-type]
    sent = req.body()
    assert not DROPPED & set(sent)  # accepted, documented as dropped, never forwarded
    assert {"user", "seed", "logit_bias", "stream_options"} <= set(sent)
    assert sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
        ({"bad_words": ["w"] * 100}, "bad_words"),
        ({"allowed_token_ids": list(range(5000))}, "allowed_token_ids"),
        ({"stop_token_ids": list(range(100))}, "stop_token_ids"),
        ({"tools": [{"type": "function"}] * 200}, "tools"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"d": "x" * 70000}}}},
            "response_format",
        ),
        ({"structured_outputs": {"grammar": "x" * 70000}}, "structured_outputs"),
        ({"guided_regex": "a" * 70000}, "guided_regex"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 300}]}, "messages.0.content"),
        ({"metadata": {"k": "v" * 20000}}, "metadata"),
        ({"cache_salt": "s"}, "cache_salt"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"priority": -10}, "priority"),
        ({"media_io_kwargs": {"video": {}}}, "media_io_kwargs"),
        ({"request_id": "x"}, "request_id"),
        ({"kv_transfer_params": {}}, "kv_transfer_params"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"min_tokens": 10**6}, "min_tokens"),
        ({"prompt_logprobs": 10**3}, "prompt_logprobs"),
    ],
)
def test_bounds_and_refusals_name_the_field(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request("chat", {"model": "m", "messages": MESSAGES, **extra}, SETTINGS)
    assert (err.value.param or "").startswith(param), err.value.message
    assert err.value.status == 400


def test_prompt_embeds_refused_on_completions() -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request("completions", {"model": "m", "prompt": "x", "prompt_embeds": "AAAA"}, SETTINGS)
    assert err.value.param == "prompt_embeds" and "prompt_embeds" in REFUSED


def test_sequences_and_the_cap() -> None:
    req = parse_request("completions", {"model": "m", "prompt": ["a"] * 16, "n": 4}, SETTINGS)
    assert isinstance(req, CompletionRequest) and req.sequences() == 64
    assert parse_request("completions", {"model": "m", "prompt": [1, 2, 3], "n": 3}, SETTINGS).sequences() == 3
    assert parse_request("completions", {"model": "m", "prompt": [[1], [2]], "best_of": 3}, SETTINGS).sequences() == 6
    for body, param in (({"prompt": ["a"] * 1024}, "prompt"), ({"prompt": ["a"] * 64, "n": 8}, "prompt")):
        with pytest.raises(InvalidRequest) as err:
            parse_request("completions", {"model": "m", **body}, SETTINGS)
        assert err.value.param == param and err.value.code == "too_many_sequences"
    small = Settings(max_request_sequences=2)
    with pytest.raises(InvalidRequest) as err:
        parse_request("chat", {"model": "m", "messages": MESSAGES, "n": 3}, small)
    assert err.value.param == "n"


def test_expected_tokens_for_quotas() -> None:
    chat = parse_request("chat", {"model": "m", "messages": MESSAGES, "max_tokens": 10, "n": 2}, SETTINGS)
    assert isinstance(chat, ChatCompletionRequest)
    assert chat.expected_tokens(SETTINGS) == chat.prompt_estimate() + 20
    completion = parse_request("completions", {"model": "m", "prompt": ["abcd" * 10, "x"]}, SETTINGS)
    assert completion.expected_tokens(SETTINGS) == (11 + 1) + 16 * 2  # vLLM's default of 16 tokens per prompt


def test_operator_allowed_fields_pass_unchecked() -> None:
    settings = Settings(allow_fields=["use_beam_search", "x_custom"], allow_engine_fields=["chat_template"])
    body = {"model": "m", "messages": MESSAGES, "use_beam_search": True, "x_custom": [1], "chat_template": "{{x}}"}
    sent = parse_request("chat", body, settings).body()
    assert sent["use_beam_search"] is True and sent["x_custom"] == [1] and sent["chat_template"] == "{{x}}"


def test_governor_controls_pass_to_the_policy() -> None:
    body = {"model": "m", "messages": MESSAGES, "decoding_preset": "strict", "dry_multiplier": 1.0}
    sent = parse_request("chat", body, SETTINGS).body()
    assert sent["decoding_preset"] == "strict" and sent["dry_multiplier"] == 1.0
