"""Tickets: requests planned by the owner process and relayed by a relay worker.

With relay workers (``GOVERNOR_RELAY_WORKERS`` > 1) every decision stays in the owner, so admission, quotas
and adapter leases are exact however many processes relay: a worker sends the client's request to the owner,
which runs the same plan as for its own requests (quota, model or adapter, upstream body), takes an engine
lease and parks the request's scope under a ticket. The worker opens the engine, relays, and reports back:
the first token, a failed engine (the owner picks the next one), and the end with what the relay saw; the
owner then closes the scope exactly as it closes its own. A worker that dies gives back all its tickets
(`drop_worker`), and a ticket nobody reports on is closed once its deadline is well past (`sweep`).

The worker names the ticket when it asks for the plan, so a client that leaves while the owner is still
planning can be reported at once: the owner cancels the plan when the worker hangs up, and where the plan
finished first (the answer crossing the hang-up), the early report (`abandon`) closes the ticket as soon as
it is issued instead of leaving it to the sweep."""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from governor.engine.base import EngineClient
from governor.engine.pool import EnginePool
from governor.errors import ClientGone, EngineUnavailable
from governor.metrics.gateway import GatewayMetrics
from governor.serving.plan import RelayPlan, stats_from_json
from governor.serving.scope import RequestScope

log = logging.getLogger("governor.relay")

# A ticket not reported on this long after its deadline is closed by the owner (its worker hung).
SWEEP_GRACE = 30.0
# A report of the end for a ticket not issued (yet) is kept this long, and at most this many.
ABANDONED_TTL = 300.0
ABANDONED_MAX = 10_000


@dataclass
class Ticket:
    """One request relayed by a worker: its scope (taken over), its engine lease, the engines tried."""

    id: str
    worker: int
    scope: RequestScope
    plan: RelayPlan
    close_scope: Callable[[], None]
    lease: contextlib.AbstractContextManager[EngineClient] | None = None
    engine: str = ""
    tried: list[str] = field(default_factory=list)

    def release_lease(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.__exit__(None, None, None)


class Tickets:
    """The owner's open tickets, by id."""

    def __init__(self, pool: EnginePool, metrics: GatewayMetrics) -> None:
        self.pool = pool
        self.metrics = metrics
        self.open: dict[str, Ticket] = {}
        self._ids = itertools.count()
        self._salt = secrets.token_hex(4)
        self.abandoned: dict[str, float] = {}  # ticket id -> when its end was reported, before it was issued

    def issue(self, scope: RequestScope, plan: RelayPlan, worker: int, ticket_id: str | None = None) -> Ticket:
        """Take an engine lease for a planned request and park its scope until the worker reports its end
        (under the worker's ``ticket_id`` where it named one, else a new id)."""
        if ticket_id is None or ticket_id in self.open:
            ticket_id = f"{self._salt}-{next(self._ids)}"
        ticket = Ticket(ticket_id, worker, scope, plan, close_scope=lambda: None)
        self._admit(ticket)  # a 429 or 503 here ends the request in the owner, as without workers
        self.metrics.relayed.labels(str(worker)).inc()
        scope.on_close(ticket.release_lease)
        ticket.close_scope = scope.detach()
        self.open[ticket.id] = ticket
        if self.abandoned.pop(ticket.id, None) is not None:  # its client left while it was being planned
            self.done(ticket, ClientGone.status, None, [])
        return ticket

    def abandon(self, ticket_id: str, now: float | None = None) -> None:
        """The end of a ticket not issued: its client left while the owner planned it. Remembered for a
        while, so the ticket closes as soon as it is issued (if the plan finishes at all)."""
        self.abandoned[ticket_id] = time.monotonic() if now is None else now
        while len(self.abandoned) > ABANDONED_MAX:
            del self.abandoned[next(iter(self.abandoned))]

    def _admit(self, ticket: Ticket) -> None:
        lease = self.pool.admit(ticket.plan.engines, exclude=ticket.tried, sequences=ticket.plan.sequences)
        ticket.engine = lease.__enter__().name
        ticket.lease = lease

    def get(self, ticket_id: str) -> Ticket | None:
        return self.open.get(ticket_id)

    def next_engine(self, ticket: Ticket, failed: str) -> str:
        """The worker could not reach ``failed``: the next engine, as the owner fails over its own requests;
        raises (EngineUnavailable, Overloaded) when none is left."""
        ticket.release_lease()
        ticket.tried.append(failed)
        if not [e for e in self.pool.ready() if e.name not in ticket.tried]:
            raise EngineUnavailable(f"Engine '{failed}' is not reachable; retry shortly.")
        self._admit(ticket)
        return ticket.engine

    def started(self, ticket: Ticket) -> None:
        ticket.scope.first_token()

    def done(self, ticket: Ticket, status: int | None, stats: dict[str, Any] | None, errors: list[str]) -> None:
        """The worker's report of the end: what the relay saw, the status it answered with, stream errors."""
        self.open.pop(ticket.id, None)
        scope = ticket.scope
        try:
            for reason in errors:
                self.metrics.stream_error(reason)
            if stats is not None:
                scope.record(stats_from_json(stats))
            if status is not None and status != 200:
                scope.status = status
        finally:
            ticket.close_scope()

    def drop_worker(self, worker: int) -> int:
        """A worker exited: every ticket it held ends as an engine error (its client's connection is gone)."""
        lost = [t for t in self.open.values() if t.worker == worker]
        for ticket in lost:
            self.done(ticket, 503, None, [])
        if lost:
            log.warning("relay worker %d exited holding %d requests; released", worker, len(lost))
        return len(lost)

    def sweep(self, now: float | None = None) -> int:
        """Close tickets whose deadline passed more than SWEEP_GRACE ago (a hung worker's)."""
        now = time.monotonic() if now is None else now
        stale = [t for t in self.open.values() if now > t.scope.deadline + SWEEP_GRACE]
        for ticket in stale:
            self.done(ticket, 504, None, [])
        for ticket_id in [i for i, at in self.abandoned.items() if now > at + ABANDONED_TTL]:
            del self.abandoned[ticket_id]
        return len(stale)
