"""The owner's side of relay workers: the private routes a worker calls (``serving/tickets.py``).

Mounted only when relay workers run, answered only to a caller presenting the workers' token (compared in
constant time), and reachable on the owner's private Unix socket as well as the public port, where without
the token they are as absent as any unknown path. The client's own headers come along, so auth, quotas and
the request id are decided exactly as for a request the owner receives itself."""

from __future__ import annotations

import dataclasses
import hmac
import re
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from governor.api import auth
from governor.api.body import read_json
from governor.api.deps import ClientDep, ServiceDep, SettingsDep
from governor.endpoint import ENDPOINTS
from governor.errors import GovernorError, NotFound
from governor.serving.request import parse_request
from governor.serving.service import until_disconnect
from governor.serving.tickets import Ticket, Tickets

PREFIX = "/internal/relay"
TOKEN_HEADER = "x-governor-relay-token"
WORKER_HEADER = "x-governor-relay-worker"
CLIENT_HEADER = "x-governor-relay-client"  # the client's address as the worker saw it
TICKET_HEADER = "x-governor-relay-ticket"  # the id the worker gives the ticket it asks for
_TICKET_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _worker(request: Request) -> int:
    """The calling worker's number, if it presents the token; otherwise the route does not exist."""
    expected: str = request.app.state.relay_token
    presented = request.headers.get(TOKEN_HEADER, "")
    worker = request.headers.get(WORKER_HEADER, "")
    if not hmac.compare_digest(presented.encode(), expected.encode()) or not worker.isdigit():
        raise NotFound("Not Found")
    return int(worker)


def _ticket(request: Request, ticket_id: str) -> tuple[Tickets, Ticket]:
    _worker(request)
    tickets: Tickets = request.app.state.tickets
    ticket = tickets.get(ticket_id)
    if ticket is None:  # closed already: its worker was taken for dead, or its deadline long past
        raise NotFound("No such ticket.")
    return tickets, ticket


def _json(data: dict[str, Any]) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


@router.post("/plan/{kind}")
async def plan(kind: str, request: Request, service: ServiceDep, client: ClientDep, settings: SettingsDep) -> Response:
    """Plan a client's generation request as the owner would serve it, and hand it to the worker."""
    worker = _worker(request)
    if kind not in ENDPOINTS:
        raise NotFound("Not Found")
    client = dataclasses.replace(client, address=request.headers.get(CLIENT_HEADER) or None)
    async with service.scope(ENDPOINTS[kind], client) as scope:  # type: ignore[index]
        auth.check_user(settings, request)
        req = parse_request(kind, await read_json(request, settings.max_body_bytes), settings)  # type: ignore[arg-type]
        scope.apply_timeout()
        relay_plan = await until_disconnect(client.disconnected, service.plan(scope, req))
        named = request.headers.get(TICKET_HEADER, "")
        ticket_id = named if _TICKET_ID.fullmatch(named) else None
        ticket = request.app.state.tickets.issue(scope, relay_plan, worker, ticket_id)
        return _json({"ticket": ticket.id, "engine": ticket.engine, "timeout": scope.remaining(),
                      "plan": relay_plan.to_json()})  # fmt: skip


@router.post("/{ticket_id}/next")
async def next_engine(ticket_id: str, request: Request) -> Response:
    """The worker could not reach its engine: the next one, or the error that ends the request."""
    tickets, ticket = _ticket(request, ticket_id)
    failed = str(orjson.loads(await request.body()).get("failed", ""))
    try:
        return _json({"engine": tickets.next_engine(ticket, failed)})
    except GovernorError as exc:
        tickets.done(ticket, exc.status, None, [])
        raise


@router.post("/{ticket_id}/started")
async def started(ticket_id: str, request: Request) -> Response:
    tickets, ticket = _ticket(request, ticket_id)
    tickets.started(ticket)
    return _json({})


@router.post("/{ticket_id}/done")
async def done(ticket_id: str, request: Request) -> Response:
    _worker(request)
    tickets: Tickets = request.app.state.tickets
    ticket = tickets.get(ticket_id)
    if ticket is None:  # not issued yet (its client left during the plan), or closed already
        tickets.abandon(ticket_id)
        return _json({})
    report = orjson.loads(await request.body())
    tickets.done(ticket, report.get("status"), report.get("stats"), list(report.get("errors") or ()))
    return _json({})
