"""Tickets (the owner's side of relay workers): a ticket holds its engine lease and scope until its worker
reports the end, fails over on the owner's rules, and is given back when its worker dies or goes silent.
Engines are RemoteEngine objects marked ready (no network: the owner only counts their budget here)."""

from __future__ import annotations

import time

import pytest

from governor.endpoint import CHAT
from governor.engine.base import EngineState
from governor.engine.pool import EnginePool
from governor.engine.remote import RemoteEngine
from governor.errors import EngineUnavailable, Overloaded
from governor.metrics.gateway import GatewayMetrics
from governor.serving.plan import RelayPlan, stats_json
from governor.serving.quota import Quotas
from governor.serving.scope import ClientInfo, RequestScope
from governor.serving.tickets import ABANDONED_MAX, ABANDONED_TTL, SWEEP_GRACE, Tickets
from governor.stream.loop_detector import LoopConfig
from governor.stream.relay import RelayStats

KEY = Quotas.client_id("sk-test", None)


async def _never() -> None:
    raise AssertionError("not watched in these tests")


def engines(*names: str) -> list[RemoteEngine]:
    made = [RemoteEngine(name, f"http://127.0.0.1:9/{name}") for name in names]
    for engine in made:
        engine.state = EngineState.READY
    return made


def plan(sequences: int = 1) -> RelayPlan:
    return RelayPlan(request_id="r1", path="/v1/chat/completions", body={"model": "m", "stream": True},
                     engines=(), sequences=sequences, kind="chat", n=1, loop=LoopConfig(min_sentence_chars=30),
                     client_usage=True, client_continuous=False, stream=True, engine_stream=True,
                     public_name="m", upstream_model="m")  # fmt: skip


async def scope_of(metrics: GatewayMetrics, quotas: Quotas | None = None) -> RequestScope:
    scope = RequestScope(CHAT, ClientInfo(None, None, "10.0.0.1", None, _never), metrics, 60.0)
    await scope.__aenter__()
    if quotas is not None:
        scope.quota = quotas.acquire(KEY, 10)
    scope.label = "m"
    return scope


def test_plans_travel_as_json() -> None:
    original = plan(3)
    assert RelayPlan.from_json(original.to_json()) == original
    assert RelayPlan.from_json({**original.to_json(), "loop": None}).loop is None


async def test_a_ticket_holds_its_lease_and_scope_until_done() -> None:
    metrics, pool = GatewayMetrics(), EnginePool(engines("e0"), max_in_flight=4)
    quotas = Quotas(rpm=0, tpm=0, concurrency=1)
    tickets = Tickets(pool, metrics)
    scope = await scope_of(metrics, quotas)
    ticket = tickets.issue(scope, plan(2), worker=1)
    assert pool.outstanding() == 2 and ticket.engine == "e0" and tickets.get(ticket.id) is ticket
    assert metrics.in_flight.value == 1
    with pytest.raises(Overloaded):  # the quota is still held
        quotas.acquire(KEY, 1)
    stats = RelayStats(prompt_tokens=5, completion_tokens=7, usage_seen=True, events=7, first_token_at=time.monotonic())
    tickets.done(ticket, None, stats_json(stats), ["upstream_error"])
    assert pool.outstanding() == 0 and tickets.get(ticket.id) is None and metrics.in_flight.value == 0
    assert scope.stats == stats and scope.status == 200
    quotas.acquire(KEY, 1).release(0)  # given back
    exposition = metrics.render().decode()
    assert 'governor_relayed_requests_total{worker="1"} 1.0' in exposition
    assert 'governor_stream_errors_total{reason="upstream_error"} 1.0' in exposition
    assert 'governor_output_tokens_total{model="m"} 7.0' in exposition


async def test_a_refused_admission_issues_no_ticket() -> None:
    metrics, pool = GatewayMetrics(), EnginePool(engines("e0"), max_in_flight=1)
    tickets = Tickets(pool, metrics)
    tickets.issue(await scope_of(metrics), plan(), worker=1)
    with pytest.raises(Overloaded):
        tickets.issue(await scope_of(metrics), plan(), worker=1)
    assert len(tickets.open) == 1 and pool.outstanding() == 1


async def test_failover_moves_the_lease_and_ends_when_no_engine_is_left() -> None:
    metrics, pool = GatewayMetrics(), EnginePool(engines("e0", "e1"), max_in_flight=4)
    tickets = Tickets(pool, metrics)
    ticket = tickets.issue(await scope_of(metrics), plan(), worker=2)
    first = ticket.engine
    second = tickets.next_engine(ticket, first)
    assert second != first and [e.outstanding for e in pool.engines if e.name == second] == [1]
    assert pool.outstanding() == 1
    with pytest.raises(EngineUnavailable):
        tickets.next_engine(ticket, second)
    assert pool.outstanding() == 0


async def test_a_dead_workers_tickets_are_released_and_only_its() -> None:
    metrics, pool = GatewayMetrics(), EnginePool(engines("e0"), max_in_flight=8)
    tickets = Tickets(pool, metrics)
    for worker in (1, 1, 2):
        tickets.issue(await scope_of(metrics), plan(), worker=worker)
    assert tickets.drop_worker(1) == 2
    assert pool.outstanding() == 1 and [t.worker for t in tickets.open.values()] == [2]
    assert 'governor_requests_total{model="m",endpoint="chat",status="503"} 2.0' in metrics.render().decode()


async def test_a_silent_ticket_is_swept_after_its_deadline() -> None:
    metrics, pool = GatewayMetrics(), EnginePool(engines("e0"), max_in_flight=8)
    tickets = Tickets(pool, metrics)
    ticket = tickets.issue(await scope_of(metrics), plan(), worker=1)
    assert tickets.sweep(ticket.scope.deadline + SWEEP_GRACE - 1) == 0
    assert tickets.sweep(ticket.scope.deadline + SWEEP_GRACE + 1) == 1
    assert pool.outstanding() == 0 and not tickets.open
    assert 'status="504"' in metrics.render().decode()


async def test_an_end_reported_before_the_ticket_is_issued_closes_it_when_issued() -> None:
    # The client left while the owner planned; the worker's report of the end crossed the plan's answer.
    metrics, pool = GatewayMetrics(), EnginePool(engines("e0"), max_in_flight=4)
    quotas = Quotas(rpm=0, tpm=0, concurrency=1)
    tickets = Tickets(pool, metrics)
    tickets.abandon("worker-named-ticket-1")
    scope = await scope_of(metrics, quotas)
    ticket = tickets.issue(scope, plan(2), worker=1, ticket_id="worker-named-ticket-1")
    assert ticket.id == "worker-named-ticket-1" and tickets.get(ticket.id) is None and not tickets.abandoned
    assert pool.outstanding() == 0 and metrics.in_flight.value == 0 and scope.status == 499
    quotas.acquire(KEY, 1).release(0)  # the quota was given back
    # A ticket named by its worker and not abandoned is held as any other.
    held = tickets.issue(await scope_of(metrics), plan(), worker=1, ticket_id="worker-named-ticket-2")
    assert tickets.get("worker-named-ticket-2") is held and pool.outstanding() == 1
    # An id already open is not reused.
    other = tickets.issue(await scope_of(metrics), plan(), worker=2, ticket_id="worker-named-ticket-2")
    assert other.id != held.id and tickets.get(other.id) is other


def test_reports_for_tickets_never_issued_are_forgotten() -> None:
    tickets = Tickets(EnginePool(engines("e0"), max_in_flight=4), GatewayMetrics())
    tickets.abandon("a" * 16, now=100.0)
    tickets.abandon("b" * 16, now=200.0)
    tickets.sweep(100.0 + ABANDONED_TTL + 1)
    assert list(tickets.abandoned) == ["b" * 16]
    for number in range(ABANDONED_MAX + 5):
        tickets.abandon(f"{number:016d}", now=300.0)
    assert len(tickets.abandoned) == ABANDONED_MAX and "b" * 16 not in tickets.abandoned
