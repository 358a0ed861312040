"""A relay worker's web app: generation requests planned by the owner and relayed here; everything else
passed to the owner as it is (``serving/tickets.py`` says how the two share the work).

A generation request: the key is checked and the body read here, then sent with the client's headers to the
owner's plan route over its private socket (one round trip; the owner's refusal, a 400 or a 429, goes back to
the client byte for byte). With a ticket, the worker opens the engine itself and relays through the same code
as the owner (``serving.service.respond``); the ticket's scope reports the first token and the end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from fastapi import FastAPI, Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from governor.api import auth
from governor.api.body import read_bytes
from governor.api.errors import install_handlers
from governor.api.relay_routes import CLIENT_HEADER, PREFIX, TICKET_HEADER, TOKEN_HEADER, WORKER_HEADER
from governor.api.sse_response import to_response
from governor.engine.remote import RemoteEngine
from governor.errors import ClientGone, EngineUnavailable, GovernorError
from governor.serving.plan import RelayPlan, stats_json
from governor.serving.service import Answer, open_upstream, respond, until_disconnect
from governor.settings import Settings
from governor.stream.relay import RelayStats

log = logging.getLogger("governor.relay")


def owner_gone() -> EngineUnavailable:
    return EngineUnavailable("The gateway's owner process is not answering; retry shortly.")


# Not forwarded either way: they describe one connection, not the request (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length", "host"})  # fmt: skip


class Owner:
    """The worker's line to the owner: its private Unix socket, the workers' token on every call."""

    def __init__(self, socket_path: Path, token: str, worker: int) -> None:
        self.socket_path = socket_path
        self.auth = {TOKEN_HEADER: token, WORKER_HEADER: str(worker)}
        self._session: aiohttp.ClientSession | None = None
        self._reports: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(path=str(self.socket_path), limit=0)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        return self._session

    async def call(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        """POST to one of the owner's relay routes: (status, raw body, response headers)."""
        async with self.session.post(f"http://owner{PREFIX}{path}", data=body,
                                     headers={**(headers or {}), **self.auth}) as resp:  # fmt: skip
            return resp.status, await resp.read(), resp.headers

    def report(self, path: str, payload: dict[str, Any], after: asyncio.Task[None] | None = None) -> asyncio.Task[None]:
        """Send a report without waiting for it (from a response's synchronous close), in order after `after`."""

        async def send() -> None:
            if after is not None:
                await asyncio.gather(after, return_exceptions=True)
            try:
                await self.call(path, orjson.dumps(payload))
            except (aiohttp.ClientError, OSError) as exc:  # the owner is going away: its tickets go with it
                log.warning("relay report %s failed: %r", path, exc)

        task = asyncio.ensure_future(send())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)
        return task

    async def close(self) -> None:
        if self._reports:
            await asyncio.wait(self._reports, timeout=5)
        if self._session is not None:
            await self._session.close()


class TicketScope:
    """A ticket's side of the request's scope: what the relay reports goes back to the owner."""

    def __init__(self, owner: Owner, ticket: str, engine: str, timeout: float) -> None:
        self.owner = owner
        self.ticket = ticket
        self.engine = engine
        self.deadline = time.monotonic() + timeout
        self.stats: RelayStats | None = None
        self.status: int | None = None
        self.errors: list[str] = []
        self._on_close: list[Callable[[], None]] = []
        self._started: asyncio.Task[None] | None = None
        self._closed = False

    def remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def first_token(self) -> None:
        if self._started is None:
            self._started = self.owner.report(f"/{self.ticket}/started", {})

    def record(self, stats: RelayStats) -> None:
        self.stats = stats

    def stream_error(self, reason: str) -> None:
        self.errors.append(reason)

    def on_close(self, release: Callable[[], None]) -> None:
        self._on_close.append(release)

    def detach(self) -> Callable[[], None]:
        return self.close

    def closed_by_owner(self) -> None:
        """The owner ended the ticket itself (no engine left to fail over to): nothing to report."""
        self._closed = True

    def close(self) -> None:
        """Once: the upstream closed (the engine stops generating), then the end reported to the owner."""
        if self._closed:
            return
        self._closed = True
        try:
            for release in reversed(self._on_close):
                release()
        finally:
            stats = stats_json(self.stats) if self.stats is not None else None
            self.owner.report(f"/{self.ticket}/done", {"status": self.status, "stats": stats, "errors": self.errors},
                              after=self._started)  # fmt: skip


def _client_disconnected(request: Request) -> Callable[[], Coroutine[Any, Any, None]]:
    receive = request.receive

    async def disconnected() -> None:  # called once the body has been read: the next message is the disconnect
        while (await receive())["type"] != "http.disconnect":
            pass

    return disconnected


def _passed_on(status: int, raw: bytes, headers: Any) -> Response:
    kept = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
    return Response(raw, status_code=status, headers=kept)


def worker_app(settings: Settings, owner: Owner, engines: dict[str, RemoteEngine]) -> FastAPI:
    """The worker's app: the two generation routes, and the owner's answer to everything else."""

    async def relay(scope: TicketScope, plan: RelayPlan) -> Answer:
        name = scope.engine
        while True:
            try:
                upstream = await open_upstream(engines[name], plan, scope.remaining())
                break
            except EngineUnavailable:
                status, raw, _ = await owner.call(f"/{scope.ticket}/next", orjson.dumps({"failed": name}))
                if status != 200:  # the owner closed the ticket: no engine left
                    scope.closed_by_owner()
                    raise
                name = orjson.loads(raw)["engine"]
        scope.on_close(upstream.abort)
        return await respond(scope, plan, upstream, scope.stream_error)

    async def generate(kind: str, request: Request) -> Response:
        auth.check_user(settings, request)  # before the body is read, as the owner does
        raw = await read_bytes(request, settings.max_body_bytes)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers[CLIENT_HEADER] = request.client.host if request.client else ""
        headers[TICKET_HEADER] = ticket = secrets.token_urlsafe(16)
        disconnected = _client_disconnected(request)
        try:
            planned = await until_disconnect(disconnected, owner.call(f"/plan/{kind}", raw, headers))
        except (aiohttp.ClientError, OSError) as exc:
            raise owner_gone() from exc
        except ClientGone:  # the owner may have issued the ticket as the client left: it ends now either way
            owner.report(f"/{ticket}/done", {"status": ClientGone.status, "stats": None, "errors": []})
            raise
        status, body, answer_headers = planned
        if status != 200:
            return _passed_on(status, body, answer_headers)
        handed = orjson.loads(body)
        plan = RelayPlan.from_json(handed["plan"])
        scope = TicketScope(owner, handed["ticket"], handed["engine"], float(handed["timeout"]))
        try:
            answer = await until_disconnect(disconnected, relay(scope, plan))
        except BaseException as exc:
            if isinstance(exc, GovernorError):
                scope.status = exc.status
            elif isinstance(exc, Exception):
                scope.status = 500
            else:  # cancelled: the server is going away or the client left
                scope.status = ClientGone.status
            scope.close()
            raise
        if answer.stream is None:
            scope.close()
        return to_response(answer)

    async def chat(request: Request) -> Response:
        return await generate("chat", request)

    async def completions(request: Request) -> Response:
        return await generate("completions", request)

    async def passed(request: Request) -> Response:
        """Any other route: the owner answers it (models, metrics, health, admin, the page)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["x-forwarded-for"] = request.client.host if request.client else ""
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        data: AsyncIterator[bytes] | None = request.stream() if has_body else None
        url = f"http://owner{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
        try:
            resp = await owner.session.request(request.method, url, data=data, headers=headers, allow_redirects=False)
        except (aiohttp.ClientError, OSError) as exc:
            raise owner_gone() from exc
        kept = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(resp.content.iter_any(), status_code=resp.status, headers=kept,
                                 background=BackgroundTask(resp.release))  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await owner.close()
            for engine in engines.values():
                await engine.stop()

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install_handlers(app)
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/{path:path}", passed, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    return app
