"""Gateway behaviour with the fake engine: auth matrix, quotas, admission, limits, policy wiring, loop cuts."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.api.conftest import ADMIN, USER, GatewayFactory, chat_body, chunked
from tests.api.test_request_path import wait_until

ROUTES = [
    ("GET", "/health", None), ("GET", "/ready", None), ("GET", "/metrics", None), ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", chat_body()),
    ("POST", "/v1/completions", {"model": "fake-model", "prompt": "hi", "max_tokens": 2}),
    ("GET", "/admin/adapters", None),
]  # fmt: skip
JSON = {"Content-Type": "application/json"}
KEYS = {"none": None, "user": USER, "admin": ADMIN, "wrong": "nope"}
# Documented statuses: /health and /ready open; /metrics open unless GOVERNOR_METRICS_AUTH; /v1 takes a
# user or the admin key; /admin only the admin key (a user key is 403, no or a wrong key 401).
EXPECTED = {
    "/health": {"none": 200, "user": 200, "admin": 200, "wrong": 200},
    "/ready": {"none": 200, "user": 200, "admin": 200, "wrong": 200},
    "/metrics": {"none": 200, "user": 200, "admin": 200, "wrong": 200},
    "/v1/models": {"none": 401, "user": 200, "admin": 200, "wrong": 401},
    "/v1/chat/completions": {"none": 401, "user": 200, "admin": 200, "wrong": 401},
    "/v1/completions": {"none": 401, "user": 200, "admin": 200, "wrong": 401},
    "/admin/adapters": {"none": 401, "user": 403, "admin": 200, "wrong": 401},
}


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def test_auth_matrix(gateway: GatewayFactory) -> None:
    gw = await gateway(api_keys=USER, admin_key=ADMIN)
    for method, path, body in ROUTES:
        for who, key in KEYS.items():
            r = await gw.client.request(method, path, json=body, headers=headers(key))
            assert r.status_code == EXPECTED[path][who], (path, who, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_metrics_can_require_a_key(gateway: GatewayFactory) -> None:
    gw = await gateway(api_keys=USER, admin_key=ADMIN, metrics_auth=True)
    assert (await gw.client.get("/metrics")).status_code == 401
    assert (await gw.client.get("/metrics", headers=headers("nope"))).status_code == 401
    assert (await gw.client.get("/metrics", headers=headers(USER))).status_code == 200


async def test_admin_api_is_off_without_admin_key(gateway: GatewayFactory) -> None:
    gw = await gateway()
    r = await gw.client.get("/admin/adapters", headers=headers("anything"))
    assert r.status_code == 403
    assert "GOVERNOR_ADMIN_KEY" in r.json()["error"]["message"]


async def test_request_quota_gives_429_with_retry_after(gateway: GatewayFactory) -> None:
    gw = await gateway(api_keys=USER, key_rpm=2)
    codes = [(await gw.client.post("/v1/chat/completions", json=chat_body(), headers=headers(USER))) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert int(codes[-1].headers["retry-after"]) >= 1
    assert codes[-1].json()["error"]["type"] == "rate_limit_error"


async def test_token_quota(gateway: GatewayFactory) -> None:
    gw = await gateway(api_keys=USER, key_tpm=10)
    first = await gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=20), headers=headers(USER))
    assert first.status_code == 200
    second = await gw.client.post("/v1/chat/completions", json=chat_body(), headers=headers(USER))
    assert second.status_code == 429 and second.json()["error"]["code"] == "token_quota_exceeded"


async def test_key_concurrency_limit(gateway: GatewayFactory) -> None:
    gw = await gateway(delay=0.05, api_keys=USER, key_concurrency=1)
    slow = asyncio.create_task(gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=40),
                                              headers=headers(USER)))  # fmt: skip
    await wait_until(lambda: gw.pool.outstanding() == 1, 10, "the first request at the engine")
    r = await gw.client.post("/v1/chat/completions", json=chat_body(), headers=headers(USER))
    assert r.status_code == 429 and r.json()["error"]["code"] == "key_concurrency_exceeded"
    assert (await slow).status_code == 200


async def test_admission_bound_gives_429_not_a_hang(gateway: GatewayFactory) -> None:
    gw = await gateway(delay=0.05, max_running=1, max_queued=0)
    slow = asyncio.create_task(gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=40)))
    await wait_until(lambda: gw.pool.outstanding() == 1, 10, "the first request at the engine")
    r = await gw.client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 429 and "retry-after" in r.headers
    assert (await slow).status_code == 200


async def test_body_too_large_is_413(gateway: GatewayFactory) -> None:
    gw = await gateway(max_body_bytes=2048)
    big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
    r = await gw.client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # No Content-Length to refuse up front: the bytes are counted as they arrive.
    r = await gw.client.post("/v1/chat/completions", content=chunked(orjson.dumps(big)), headers=JSON)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # The same body just under the limit, chunked, is read whole.
    fits = orjson.dumps(chat_body(messages=[{"role": "user", "content": "x" * 1900}]))
    assert len(fits) <= 2048
    r = await gw.client.post("/v1/chat/completions", content=chunked(fits, 100), headers=JSON)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"decoding_preset": "no-such-preset"}, "decoding_preset"),
        ({"dry_allowed_length": -1}, "dry_allowed_length"),
        ({"ngram_size": -3}, "ngram_size"),
        ({"rep_window": 10**7}, "rep_window"),
        ({"rep_penalty": 1.2, "rep_exempt": [10**9]}, "rep_exempt"),
        ({"dry_multiplier": "lots"}, "dry_multiplier"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"n": 1000}, "n"),
        ({"stop": ["s"] * 100}, "stop"),
        ({"logits_processors": ["x"]}, "logits_processors"),
        ({"chat_template": "{{ x }}"}, "chat_template"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(gateway: GatewayFactory, extra: dict[str, Any], param: str) -> None:
    gw = await gateway()
    r = await gw.client.post("/v1/chat/completions", json=chat_body(**extra))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_presets_become_engine_args(gateway: GatewayFactory) -> None:
    gw = await gateway()
    await gw.client.post("/v1/chat/completions", json=chat_body())
    await gw.client.post("/v1/chat/completions", json=chat_body(decoding_preset="off"))
    await gw.client.post("/v1/chat/completions", json=chat_body(decoding_preset="strict", dry_multiplier=1.5))
    balanced, off, strict = gw.fake.requests[-3:]
    assert balanced["vllm_xargs"]["gov_dry_multiplier"] > 0
    assert "vllm_xargs" not in off and "decoding_preset" not in off
    assert strict["vllm_xargs"]["gov_dry_multiplier"] == 1.5 and strict["vllm_xargs"]["gov_ngram_size"] > 0


async def test_loop_is_cut_streaming_and_trimmed_when_not(gateway: GatewayFactory) -> None:
    words = ("The tide comes in and the tide goes out. " * 20).split(" ")
    gw = await gateway(script=[w + " " for w in words if w])
    r = await gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=500))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "loop_detected"
    assert choice["message"]["content"].count("The tide comes in") == 1
    assert r.json()["usage"]["completion_tokens"] > 10
    r = await gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=500, stream=True))
    events = [orjson.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    final = [e for e in events if e["choices"] and e["choices"][0].get("finish_reason")][-1]
    assert final["choices"][0]["stop_reason"] == "loop_detected"
    assert r.text.rstrip().endswith("data: [DONE]")
    metrics = (await gw.client.get("/metrics")).text
    assert 'governor_loops_detected_total{model="fake-model"} 2.0' in metrics


async def test_finished_streams_reuse_the_engine_connection_and_cut_ones_close_it(gateway: GatewayFactory) -> None:
    loop = [w + " " for w in ("The tide comes in and the tide goes out. " * 20).split(" ") if w]
    gw = await gateway(script=loop, delay=0.01)  # still generating when the cut comes
    for preset in ("off", "balanced"):
        for _ in range(3):
            r = await gw.client.post("/v1/chat/completions",
                                     json=chat_body(max_tokens=8, stream=True, decoding_preset=preset))  # fmt: skip
            assert r.text.rstrip().endswith("data: [DONE]")
    # Pooled connections for all six; the engine's health checks share the pool, so one that is in
    # flight when a request starts makes that request open a second connection (never more).
    assert len(set(gw.fake.peers)) <= 2, gw.fake.peers
    r = await gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=500, stream=True))
    assert '"stop_reason":"loop_detected"' in r.text
    # the cut closed the connection: the engine stops generating
    await wait_until(lambda: gw.fake.aborted >= 1, 10, "the engine to be told to stop")
    await gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=4, stream=True))
    assert gw.fake.peers[-1] != gw.fake.peers[-2]  # the cut request's connection is gone


async def test_draining_refuses_new_requests(gateway: GatewayFactory) -> None:
    gw = await gateway()
    gw.pool.draining = True
    assert (await gw.client.get("/ready")).status_code == 503
    r = await gw.client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
