"""The generation service: typed request → target → admission → upstream body → engine → relay.

The route opens a `RequestScope`, parses the body into a `GenerationRequest` and calls `generate`;
the scope owns every lease the request takes and releases them in one place. The HTTP layer (api/)
sits above this module and is never imported here."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from governor.endpoint import Endpoint
from governor.engine.base import EngineClient, Upstream
from governor.engine.pool import EnginePool
from governor.errors import (
    ClientGone,
    EngineUnavailable,
    GovernorError,
    InvalidRequest,
    from_status,
    from_transport,
)
from governor.metrics.gateway import GatewayMetrics
from governor.policy.builder import Policy
from governor.serving.catalog import ModelCatalog
from governor.serving.plan import RelayPlan, RelayScope
from governor.serving.quota import Quotas
from governor.serving.request import GenerationRequest
from governor.serving.scope import ClientInfo, RequestScope
from governor.settings import Settings
from governor.stream.relay import Relay, RelayStats

__all__ = ["Answer", "ClientInfo", "GenerationService", "ReadyProbe", "RelayPlan", "RequestScope"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Answer:
    """What the service answers, for the HTTP edge to send: a JSON body, or server-sent events and what to
    run once they end, however they end (the scope's close: usage recorded, leases given back)."""

    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    on_close: Callable[[], None] | None = None


class GenerationService:
    """Serves /v1/chat/completions and /v1/completions."""

    def __init__(
        self,
        settings: Settings,
        pool: EnginePool,
        policy: Policy,
        metrics: GatewayMetrics,
        catalog: ModelCatalog,
        quotas: Quotas | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.policy = policy
        self.metrics = metrics
        self.catalog = catalog
        self.quotas = quotas

    def scope(self, endpoint: Endpoint, client: ClientInfo) -> RequestScope:
        """The scope one request runs in (opened by the route before it parses the body, so a 400 counts)."""
        return RequestScope(endpoint, client, self.metrics, self.settings.request_timeout)

    async def generate(self, scope: RequestScope, req: GenerationRequest) -> Answer:
        """Serve one typed request; a client that leaves before its answer is ready aborts it upstream."""
        scope.apply_timeout()
        return await until_disconnect(scope.client.disconnected, self._generate(scope, req))

    def _admit_quota(self, scope: RequestScope, req: GenerationRequest) -> None:
        if self.quotas is None:
            return
        client = scope.client
        # Without configured keys a presented key proves nothing (openai-python always sends one): the
        # address is the identity then.
        key = client.key if self.settings.api_keys else None
        ident = Quotas.client_id(key, client.address)
        scope.quota = self.quotas.acquire(ident, req.expected_tokens(self.settings))
        if scope.quota is not None:
            scope.prompt_estimate = req.prompt_estimate()

    async def _generate(self, scope: RequestScope, req: GenerationRequest) -> Answer:
        plan = await self.plan(scope, req)
        upstream = await self._open_any(scope, plan)
        self.metrics.relayed.labels("0").inc()
        return await respond(scope, plan, upstream, self.metrics.stream_error)

    async def plan(self, scope: RequestScope, req: GenerationRequest) -> RelayPlan:
        """Admit the request (quota, its model or adapter, the upstream body) and say how it is relayed; the
        scope holds what admission took. An engine is not chosen yet."""
        seqs = req.sequences()
        if seqs > self.pool.max_in_flight:
            raise InvalidRequest(
                f"This request asks for {seqs} sequences; the engine holds at most {self.pool.max_in_flight}.",
                param="prompt" if req.prompt_count() > 1 else "n",
                code="too_many_sequences",
            )
        self._admit_quota(scope, req)  # before any work: a 429 costs nothing
        target = await self.catalog.resolve(req.model, min(self.settings.adapter_wait_seconds, scope.remaining()))
        scope.hold(target)
        scope.label = self.metrics.model_label(target.public_name)
        salt = None
        if self.settings.cache_salt_per_key and self.settings.api_keys and scope.client.key:
            # the engine's prefix cache is shared only between requests of one key (its hash, not its text)
            salt = Quotas.client_id(scope.client.key, None)
        call = req.to_upstream(self.policy, target, salt)
        scope.admitted()
        scope.answer_is_usage = not call.stream
        return RelayPlan(
            request_id=scope.request_id, path=scope.endpoint.path, body=call.body, engines=tuple(target.engines),
            sequences=seqs, kind=req.endpoint.kind, n=req.prompt_count() * req.n, loop=call.loop,
            client_usage=req.wants_usage, client_continuous=req.wants_continuous_usage, stream=req.stream,
            engine_stream=call.stream, public_name=target.public_name, upstream_model=target.upstream_model,
        )  # fmt: skip

    async def _open_any(self, scope: RequestScope, plan: RelayPlan) -> Upstream:
        """Open on the best engine; if it cannot be reached (nothing sent yet), fail over to the next.
        The engine lease and the open response stay with the scope."""
        tried: list[str] = []
        while True:
            lease = self.pool.admit(plan.engines, exclude=tried, sequences=plan.sequences)
            engine = lease.__enter__()
            try:
                upstream = await open_upstream(engine, plan, scope.remaining())
            except BaseException as exc:
                lease.__exit__(type(exc), exc, exc.__traceback__)
                if not isinstance(exc, EngineUnavailable):
                    raise
                tried.append(engine.name)
                if not [e for e in self.pool.ready() if e.name not in tried]:
                    raise
                continue
            scope.enter(_Held(lease))
            scope.on_close(upstream.abort)  # runs first: the engine stops generating before the lease is freed
            return upstream


async def open_upstream(engine: EngineClient, plan: RelayPlan, timeout: float) -> Upstream:
    """Send the planned body to one engine; a refusal (not 200) becomes Governor's error."""
    # A suffix keeps vLLM's ids unique even when a client reuses its X-Request-Id.
    headers = {"X-Request-Id": f"{plan.request_id}-{uuid.uuid4().hex[:8]}"}
    upstream = await engine.open(plan.path, plan.body, headers, timeout=timeout)
    if upstream.status != 200:
        try:
            raw = await upstream.read()
        except Exception as exc:
            raise from_transport(exc, started=False) from exc
        raise upstream_error(upstream.status, raw)
    return upstream


async def respond(scope: RelayScope, plan: RelayPlan, upstream: Upstream, on_error: Callable[[str], None]) -> Answer:
    """Relay an open upstream response as the plan says: a stream, a collected stream, or vLLM's own answer."""
    # A collected answer is read in a loop that never waits while upstream data is buffered: give the
    # event loop a turn per network read, or a disconnect is only seen once a backlog is parsed.
    source = upstream if plan.stream else _Yielding(upstream)
    relay = Relay(source, kind=plan.kind, n=plan.n, loop=plan.loop, client_usage=plan.client_usage,
                  client_continuous=plan.client_continuous, request_id=plan.request_id, on_error=on_error,
                  on_first_token=scope.first_token)  # fmt: skip
    headers = {"X-Request-Id": plan.request_id}
    if plan.stream:
        return _stream_response(scope, relay, plan)
    if plan.engine_stream:
        try:
            data = await relay.collect()
        finally:
            scope.record(relay.stats)
        data["model"] = plan.public_name
        return Answer(headers, orjson.dumps(data))
    scope.first_token()  # vLLM's non-streamed answer gives no first-token signal: running from here
    return await _passthrough(scope, upstream, plan, headers)


class _Yielding:
    """An upstream whose reads each give the event loop a turn (see `_generate`)."""

    def __init__(self, inner: Upstream) -> None:
        self.inner = inner
        self.status = inner.status

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner.chunks():
            yield chunk
            await asyncio.sleep(0)

    async def read(self) -> bytes:
        return await self.inner.read()

    def abort(self) -> None:
        self.inner.abort()


class _Held(contextlib.AbstractContextManager[None]):
    """An engine lease already entered (failover needs to enter it before the scope may keep it)."""

    def __init__(self, lease: contextlib.AbstractContextManager[EngineClient]) -> None:
        self.lease = lease

    def __exit__(self, *exc: object) -> None:
        self.lease.__exit__(None, None, None)


async def until_disconnect(disconnected: Callable[[], Awaitable[None]], work: Coroutine[Any, Any, T]) -> T:
    """Run `work` while watching the client: if it leaves first, `work` is cancelled (which closes the
    upstream connection, so vLLM aborts the generation) and the request ends as 499."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone("The client disconnected before the response was ready.")
    finally:
        if not watch.done():
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)


def _stream_response(scope: RelayScope, relay: Relay, plan: RelayPlan) -> Answer:
    """The streamed answer; it owns the scope from here and closes it once the stream ends."""
    rename = plan.upstream_model != plan.public_name
    old = f'"model":"{plan.upstream_model}"'.encode()
    new = f'"model":"{plan.public_name}"'.encode()
    completed = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal completed
        async for chunk in relay.stream():
            yield chunk.replace(old, new) if rename else chunk
        completed = True

    close_scope = scope.detach()

    def close() -> None:
        if not completed and relay.stats.outcome == "ok":
            relay.stats.outcome = "disconnect"
        scope.record(relay.stats)
        close_scope()

    return Answer({"X-Request-Id": plan.request_id}, stream=body(), on_close=close)


async def _passthrough(scope: RelayScope, upstream: Upstream, plan: RelayPlan, headers: dict[str, str]) -> Answer:
    """vLLM's own non-streaming answer (tools, structured output, echo…), relayed as it is."""
    try:
        raw = await upstream.read()
    except Exception as exc:  # aiohttp's errors, resets, the deadline: one mapping
        raise from_transport(exc, started=True) from exc
    try:
        data = orjson.loads(raw)
        usage = data.get("usage") or {}
        stats = RelayStats(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), True)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise EngineUnavailable("The engine's answer was not valid JSON.") from exc
    scope.record(stats)
    if plan.upstream_model != plan.public_name:
        data["model"] = plan.public_name
        raw = orjson.dumps(data)
    return Answer(headers, raw)


def upstream_error(status: int, raw: bytes) -> GovernorError:
    """vLLM's error as Governor's envelope: its message kept, 4xx status kept, 5xx → 503."""
    message = raw.decode("utf-8", "replace")[:2000]
    param = None
    try:
        data = orjson.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            param = err.get("param") if isinstance(err.get("param"), str) else None
    except orjson.JSONDecodeError:
        pass
    exc = from_status(status, message) if status < 500 else from_status(503, f"Engine error: {message}")
    exc.param = param
    return exc


ReadyProbe = Callable[[], Awaitable[bool]]
