"""The request scope: request ids kept or replaced (and the replacement logged safely), and one release."""

from __future__ import annotations

import ast
import contextlib
import logging
from collections.abc import Iterator

import pytest

from governor.endpoint import CHAT
from governor.errors import InvalidRequest
from governor.logs import FieldsFormatter
from governor.metrics.gateway import GatewayMetrics
from governor.serving.quota import Quotas
from governor.serving.scope import ClientInfo, RequestScope, request_id
from governor.stream.relay import RelayStats
from governor.target import Target


async def _never() -> None:
    raise AssertionError("not watched in these tests")


def client(rid: str | None = None, timeout: str | None = None) -> ClientInfo:
    return ClientInfo(rid, None, "127.0.0.1", timeout, _never)


def test_plain_request_ids_are_kept() -> None:
    for rid in ("abc", "a.b:c_d-1", "x" * 128):
        assert request_id(rid) == rid


def test_other_request_ids_are_replaced_and_logged_as_one_field(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "governor.requests")
    fresh = request_id("x status=200 adapter=admin")
    assert len(fresh) == 32 and fresh != request_id("x status=200 adapter=admin")
    line = FieldsFormatter("%(message)s").format(caplog.records[-1])
    assert line.count("=") == 2 and "status=" not in line and "adapter=" not in line
    assert ast.literal_eval(line.split("original=", 1)[1]) == "x status=200 adapter=admin"
    assert request_id(None) != request_id(None)
    for bad in ("", "x" * 129, "a b", "é"):
        assert request_id(bad) != bad


async def test_close_releases_everything_once() -> None:
    metrics = GatewayMetrics()
    released: list[str] = []
    quotas = Quotas(rpm=0, tpm=0, concurrency=1)

    @contextlib.contextmanager
    def lease() -> Iterator[None]:
        yield
        released.append("engine")

    async with RequestScope(CHAT, client(), metrics, 60.0) as scope:
        scope.quota = quotas.acquire("key:k", 10)
        scope.hold(Target("m", "m", done=lambda: released.append("adapter")))
        scope.enter(lease())
        scope.on_close(lambda: released.append("upstream"))
    assert released == ["upstream", "engine", "adapter"]
    scope.close()
    assert released == ["upstream", "engine", "adapter"]  # closed once
    assert quotas.acquire("key:k", 1) is not None  # the concurrency slot came back
    text = metrics.render().decode()
    assert "governor_requests_in_flight 0.0" in text
    assert 'governor_requests_total{model="other",endpoint="chat",status="200"} 1.0' in text


async def test_errors_set_the_status_and_still_release() -> None:
    metrics = GatewayMetrics()
    released: list[str] = []
    with pytest.raises(InvalidRequest):
        async with RequestScope(CHAT, client(timeout="soon"), metrics, 60.0) as scope:
            scope.on_close(lambda: released.append("x"))
            scope.apply_timeout()
    assert scope.status == 400 and released == ["x"]
    detached: list[str] = []
    async with RequestScope(CHAT, client(), metrics, 60.0) as streaming:
        streaming.on_close(lambda: detached.append("x"))
        close = streaming.detach()
    assert detached == []  # the stream owns it now
    close()
    assert detached == ["x"]


def test_timeout_header_only_shortens_the_deadline() -> None:
    scope = RequestScope(CHAT, client(timeout="5"), GatewayMetrics(), 60.0)
    scope.apply_timeout()
    assert 4 < scope.remaining() <= 5
    scope = RequestScope(CHAT, client(timeout="500"), GatewayMetrics(), 60.0)
    scope.apply_timeout()
    assert 59 < scope.remaining() <= 60


@pytest.mark.parametrize(
    ("stats", "answer_is_usage", "status", "cost"),
    [
        (RelayStats(7, 30, usage_seen=True, events=12), False, 200, 37),  # the engine's usage: exact
        (RelayStats(events=90), False, 499, 5 + 90),  # hung up before the usage event: what was relayed
        (None, True, 499, 500),  # a non-streamed answer that never came: the admission charge stands
        (None, True, 504, 500),
        (None, True, 503, 0),  # lost by the engine: nothing
        (None, False, 400, 0),  # refused before any engine saw it
    ],
)
async def test_the_quota_charge_follows_what_was_generated(
    stats: RelayStats | None, answer_is_usage: bool, status: int, cost: int
) -> None:
    quotas = Quotas(rpm=0, tpm=10_000, concurrency=0, clock=lambda: 0.0)
    async with RequestScope(CHAT, client(), GatewayMetrics(), 60.0) as scope:
        scope.quota = quotas.acquire("key:k", 500)
        scope.prompt_estimate = 5
        scope.answer_is_usage = answer_is_usage
        scope.status = status
        if stats is not None:
            scope.record(stats)
            scope.status = status
    usage = quotas.usage("key:k")
    assert usage is not None and usage.running == 0
    assert 10_000 - usage.tokens_left == cost
