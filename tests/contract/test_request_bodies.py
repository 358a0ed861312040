"""Every upstream body Governor builds is a request this vLLM accepts, field for field.

Client requests go through the whole gateway (routes, policy from the embedded model's tokenizer,
adapter profiles, the service's upstream streaming) to the fake engine; the bodies the engine receives
are validated with this version's own ChatCompletionRequest / CompletionRequest. vLLM's request models
allow unknown fields and drop them silently, so `model_extra` must be empty too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from governor.bench.fake_adapter import write_adapter
from governor.engine import compat
from governor.processors import extra_args as xa
from tests.api.conftest import ADMIN, Gateway, GatewayFactory
from tests.contract import vllm_under_test as vut
from tests.lora.factory import BASE_DIR

AUTH = {"Authorization": f"Bearer {ADMIN}"}
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
USER_PRESET = "contract-user"
# A user preset that sets every kind of field a preset can: processor args (token ids included),
# vLLM passthrough fields and loop settings.
PRESETS_FILE = {
    USER_PRESET: {
        "extends": "strict",
        "description": "contract test preset",
        "dry_breakers": ["\n", "."],
        "ngram_window": 0,
        "rep_scope": "all",
        "rep_exempt": [5, 7],
        "repetition_penalty": 1.05,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.1,
        "repetition_detection": {"max_pattern_size": 8, "min_count": 4},
        "loop_buffer_chars": 4096,
    }
}
ADAPTER = "contract-adapter"
ADAPTER_PROFILE = {"preset": "balanced", "template": "alpaca", "stop": ["### End"], "rep_exempt": [11]}
PRESETS = ("off", "balanced", "strict", USER_PRESET)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}


def client_body(kind: str, **extra: Any) -> dict[str, Any]:
    if kind == "chat":
        return {"model": "fake-model", "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 4,
                **extra}  # fmt: skip
    return {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 4, **extra}


# (case id, endpoint kind, client body): every shape of request the gateway forwards.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    *(
        (f"{kind}-{preset}-{'stream' if stream else 'whole'}", kind, client_body(kind, stream=stream,
                                                                                 decoding_preset=preset))
        for kind in PATHS
        for preset in PRESETS
        for stream in (False, True)
    ),
    *((f"{kind}-server-default", kind, client_body(kind)) for kind in PATHS),
    *(
        (f"{kind}-adapter-{'stream' if stream else 'whole'}", kind, client_body(kind, model=ADAPTER, stream=stream))
        for kind in PATHS
        for stream in (False, True)
    ),
    *((f"{kind}-adapter-strict", kind, client_body(kind, model=ADAPTER, decoding_preset="strict")) for kind in PATHS),
    *((f"{kind}-ignore-eos", kind, client_body(kind, ignore_eos=True, stop=["END"])) for kind in PATHS),
    *((f"{kind}-adapter-ignore-eos", kind, client_body(kind, model=ADAPTER, ignore_eos=True)) for kind in PATHS),
    *(
        (f"{kind}-stream-options", kind, client_body(kind, stream=True, decoding_preset=preset,
                                                     stream_options={"include_usage": True,
                                                                     "continuous_usage_stats": True}))
        for kind in PATHS
        for preset in ("off", "balanced")
    ),
    *(
        (f"{kind}-overrides", kind, client_body(kind, decoding_preset="balanced", dry_multiplier=0.5, dry_range=0,
                                                dry_breakers=[";"], ngram_size=4, rep_penalty=1.2, rep_exempt=[3, 4],
                                                rep_exempt_digits_punct=False, loop_detection=True))
        for kind in PATHS
    ),
    *(
        (f"{kind}-sampling-fields", kind, client_body(kind, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=1,
                                                      n=2, stop=["\n\n"], stop_token_ids=[2], presence_penalty=0.1,
                                                      frequency_penalty=0.1, repetition_penalty=1.05, user="u-1"))
        for kind in PATHS
    ),
    ("chat-logprobs", "chat", client_body("chat", logprobs=True, top_logprobs=2, max_completion_tokens=4)),
    ("completions-logprobs", "completions", client_body("completions", logprobs=2)),
    ("completions-batch-prompts", "completions", client_body("completions", prompt=["one", "two"])),
    ("completions-token-prompt", "completions", client_body("completions", prompt=[1, 2, 3])),
    ("chat-tools", "chat", client_body("chat", tools=TOOLS, tool_choice="auto")),
    ("chat-tools-stream", "chat", client_body("chat", tools=TOOLS, tool_choice="auto", stream=True)),
    ("chat-response-format", "chat", client_body("chat", response_format={"type": "json_object"})),
    ("chat-json-schema-stream", "chat", client_body("chat", response_format=SCHEMA, stream=True)),
    ("completions-response-format", "completions", client_body("completions", response_format=SCHEMA)),
]  # fmt: skip


def upstream_problems(kind: str, body: dict[str, Any]) -> list[str]:
    """Why this vLLM would refuse `body` or silently drop part of it; empty when it takes it whole."""
    problems = []
    try:
        request = vut.request_class(kind).model_validate(body)
    except ValidationError as exc:
        errors = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]]
        problems.append(f"vLLM {vut.VERSION} refuses it ({exc.error_count()} errors): {errors}")
    else:
        if request.model_extra:
            problems.append(f"vLLM {vut.VERSION} would drop these fields: {sorted(request.model_extra)}")
    # Explicit too, whatever this version's types say: 0.25's CompletionRequest takes str | int | float only.
    xargs = body.get("vllm_xargs") or {}
    bad = {key: type(value).__name__ for key, value in xargs.items() if isinstance(value, bool | list | tuple | dict)}
    if bad:
        problems.append(f"vllm_xargs values must be scalars (str, int, float): {bad}")
    return problems


async def send_all(gw: Gateway, cases: list[tuple[str, str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each case through the gateway; the body the engine received for it, by case id."""
    received = {}
    for case, kind, body in cases:
        before = len(gw.fake.requests)
        r = await gw.client.post(PATHS[kind], json=body, headers=AUTH)
        assert r.status_code == 200, f"{case}: {r.status_code} {r.text}"
        assert len(gw.fake.requests) == before + 1, case
        received[case] = gw.fake.requests[-1]
    return received


async def start(gateway: GatewayFactory, tmp_path: Path) -> Gateway:
    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps(PRESETS_FILE))
    gw = await gateway(admin_key=ADMIN, presets_file=presets)
    folder = write_adapter(gw.settings.adapters_dir, ADAPTER)
    (folder / "governor.json").write_text(json.dumps(ADAPTER_PROFILE))
    r = await gw.client.post("/admin/adapters", json={"name": ADAPTER, "path": ADAPTER}, headers=AUTH)
    assert r.status_code == 200, r.text
    return gw


async def test_every_upstream_body_validates_against_this_vllm(gateway: GatewayFactory, tmp_path: Path) -> None:
    if not (BASE_DIR / "tokenizer.json").is_file():
        pytest.fail(f"the embedded model is needed for the real policy: run `make model` ({BASE_DIR})")
    gw = await start(gateway, tmp_path)
    received = await send_all(gw, CASES)
    failures = {case: problems for case, kind, _ in CASES if (problems := upstream_problems(kind, received[case]))}
    assert not failures, json.dumps(failures, indent=1)
    # The matrix really exercised what it is meant to: token-id lists, template stops, adapter routing.
    bodies = received.values()
    assert any(xa.DRY_BREAKERS in (b.get("vllm_xargs") or {}) for b in bodies)
    assert any(xa.REP_EXEMPT in (b.get("vllm_xargs") or {}) for b in bodies)
    assert received["completions-balanced-whole"]["stream"] is True  # loops are cut on a stream upstream
    assert received["completions-adapter-whole"]["model"] != "fake-model"
    assert "### End" in received["completions-adapter-whole"]["stop"]
    assert received["completions-adapter-ignore-eos"].get("ignore_eos") is True
    assert set(xa.parse_ids(received["chat-overrides"]["vllm_xargs"][xa.REP_EXEMPT], xa.REP_EXEMPT)) == {3, 4}
    assert received["chat-tools"]["tools"] == TOOLS


def test_the_check_fails_on_the_old_list_encoding() -> None:
    """Proof the body check can fail: a token-id list in vllm_xargs (how Governor sent them before)."""
    body = client_body("completions", vllm_xargs={xa.DRY_MULTIPLIER: 1.0, xa.DRY_BREAKERS: [198, 25]})
    problems = upstream_problems("completions", body)
    assert any("must be scalars" in p for p in problems), problems
    body["vllm_xargs"][xa.DRY_BREAKERS] = xa.encode_ids([198, 25])
    assert upstream_problems("completions", body) == []


def test_the_check_fails_on_a_field_vllm_would_drop() -> None:
    problems = upstream_problems("chat", client_body("chat", decoding_preset="balanced"))
    assert problems == [f"vLLM {vut.VERSION} would drop these fields: ['decoding_preset']"]


def test_list_valued_xargs_are_refused_somewhere_on_every_version() -> None:
    """0.25.0's CompletionRequest refuses a list in vllm_xargs (the 400 every balanced/strict completion got
    from a 0.25 engine); on versions whose request models accept lists, Governor's processors refuse them."""
    body = client_body("completions", vllm_xargs={xa.DRY_MULTIPLIER: 1.0, xa.DRY_BREAKERS: [198, 25]})
    if compat.release(vut.VERSION) == compat.OLDEST:
        problems = upstream_problems("completions", body)
        assert any("refuses it" in p and "vllm_xargs.gov_dry_breakers" in p for p in problems), problems
    with pytest.raises(ValueError, match=f"^{xa.DRY_BREAKERS}: "):
        xa.parse_dry(body["vllm_xargs"])
    # Every supported version takes the scalar form on both endpoints.
    scalar = {xa.DRY_MULTIPLIER: 1.0, xa.DRY_BREAKERS: "198,25", xa.REP_EXEMPT: ""}
    for kind in PATHS:
        request = vut.request_class(kind).model_validate(client_body(kind, vllm_xargs=scalar))
        assert request.vllm_xargs == scalar
