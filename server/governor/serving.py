"""The generation service: body → validation → target → policy → admission → upstream → relay."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from governor.api.auth import presented_key
from governor.api.quota import Quotas
from governor.api.schemas import ChatCompletionRequest, CompletionRequest, Kind, check_limits
from governor.engine.base import EngineClient, Upstream
from governor.engine.pool import EnginePool
from governor.errors import (
    EngineUnavailable,
    GovernorError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    from_status,
)
from governor.metrics.gateway import GatewayMetrics
from governor.policy.builder import Policy
from governor.settings import Settings
from governor.stream.relay import Relay, RelayStats
from governor.stream.response import SSEResponse

log = logging.getLogger("governor.requests")

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class Target:
    """What a request's `model` names: the base model or an adapter, and how to reach it upstream."""

    public_name: str
    upstream_model: str
    adapter: str | None = None
    profile: dict[str, Any] | None = None
    engines: tuple[str, ...] = ()
    done: Callable[[], None] = field(default=lambda: None)


class AdapterResolver(Protocol):
    """The adapter registry as the service sees it (issue B)."""

    async def target(self, name: str) -> Target | None: ...


@dataclass
class RequestContext:
    request_id: str
    kind: Kind
    started: float
    deadline: float
    target: Target | None = None
    label: str = "other"
    status: int = 200
    quota_id: str | None = None
    tokens: int = 0


async def read_body(request: Request, limit: int) -> dict[str, Any]:
    """The JSON body, bounded before it is buffered: 413 past `limit`, 400 if not a JSON object."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body exceeds {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds {limit} bytes.")
        chunks.append(chunk)
    try:
        data = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object.", code="invalid_json")
    return data


def _validation(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    where = f"'{param}': " if param else ""
    return InvalidRequest(f"{where}{first.get('msg', 'invalid value')}", param=param)


class GenerationService:
    """Serves /v1/chat/completions and /v1/completions."""

    def __init__(
        self,
        settings: Settings,
        pool: EnginePool,
        policy: Callable[[], Policy],
        metrics: GatewayMetrics,
        adapters: AdapterResolver | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.policy = policy
        self.metrics = metrics
        self.adapters = adapters
        self.quotas = quotas

    async def resolve(self, name: str) -> Target:
        base = self.pool.served_model
        if name == base:
            return Target(public_name=name, upstream_model=name)
        if self.adapters is not None:
            target = await self.adapters.target(name)
            if target is not None:
                return target
        known = f" Available: '{base}'." if base else ""
        raise ModelNotFound(f"The model '{name}' does not exist.{known}", param="model")

    def _timeout(self, request: Request) -> float:
        """The server's deadline, or a shorter one a client asks for with X-Governor-Timeout (seconds)."""
        asked = request.headers.get("x-governor-timeout")
        if asked is None:
            return self.settings.request_timeout
        try:
            value = float(asked)
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise InvalidRequest("X-Governor-Timeout must be a positive number of seconds.", param="X-Governor-Timeout")
        return min(value, self.settings.request_timeout)

    async def handle(self, kind: Kind, request: Request) -> Response:
        now = time.monotonic()
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        ctx = RequestContext(rid[:128], kind, now, now + self._timeout(request))
        if self.quotas is not None and self.quotas.enabled:
            key = presented_key(request)
            if key:
                ident = Quotas.identity(key)
                self.quotas.acquire(ident)  # 429 before any work when the key is over its limits
                ctx.quota_id = ident
        self.metrics.in_flight.inc()
        streaming = False
        try:
            response = await self._serve(ctx, request)
            streaming = isinstance(response, SSEResponse)
            return response
        except GovernorError as exc:
            ctx.status = exc.status
            if exc.status >= 500:
                log.warning("request failed: %s", exc.message, extra={"request_id": ctx.request_id})
            raise
        finally:
            if not streaming:
                self._finish(ctx, None)

    async def _serve(self, ctx: RequestContext, request: Request) -> Response:
        raw = await read_body(request, self.settings.max_body_bytes)
        model_cls = ChatCompletionRequest if ctx.kind == "chat" else CompletionRequest
        try:
            req = model_cls.model_validate(raw)
        except ValidationError as exc:
            raise _validation(exc) from exc
        check_limits(req, raw, self.settings)
        ctx.target = target = await self.resolve(req.model)
        ctx.label = self.metrics.model_label(target.public_name)
        decision = self.policy().build(raw, kind=ctx.kind, profile=target.profile)
        body = decision.body
        body["model"] = target.upstream_model
        n = req.n * (req.prompt_count() if isinstance(req, CompletionRequest) else 1)
        stream_up = req.stream or (decision.loop is not None and req.assemblable())
        if stream_up:
            opts: dict[str, Any] = dict(body.get("stream_options") or {})
            opts["include_usage"] = True
            if decision.loop is not None:
                opts["continuous_usage_stats"] = True  # exact usage even when Governor cuts the stream
            body["stream"], body["stream_options"] = True, opts
        engine, upstream = await self._open_any(target, ctx, body)
        released = False
        try:
            relay = Relay(upstream, kind=ctx.kind, n=n, loop=decision.loop, client_usage=req.wants_usage,
                          client_continuous=req.wants_continuous_usage, request_id=ctx.request_id,
                          on_error=self.metrics.stream_error)  # fmt: skip
            headers = {"X-Request-Id": ctx.request_id}
            if req.stream:
                released = True
                return self._stream_job(ctx, relay, engine)
            if stream_up:
                data = await relay.collect()
                self._record(ctx, relay.stats)
                data["model"] = target.public_name
                return Response(orjson.dumps(data), media_type="application/json", headers=headers)
            return await self._passthrough(ctx, upstream, target, headers)
        finally:
            if not released:
                engine.outstanding -= 1

    async def _open_any(
        self, target: Target, ctx: RequestContext, body: dict[str, Any]
    ) -> tuple[EngineClient, Upstream]:
        """Open on the best engine; if it cannot be reached (nothing sent yet), fail over to the next.
        Returns with the engine's outstanding count held."""
        tried: list[str] = []
        while True:
            engine = self.pool.pick(target.engines, exclude=tried)
            engine.outstanding += 1
            try:
                return engine, await self._open(engine, ctx, body)
            except EngineUnavailable:
                engine.outstanding -= 1
                tried.append(engine.name)
                if not [e for e in self.pool.ready() if e.name not in tried]:
                    raise
            except BaseException:
                engine.outstanding -= 1
                raise

    async def _open(self, engine: EngineClient, ctx: RequestContext, body: dict[str, Any]) -> Upstream:
        remaining = max(0.001, ctx.deadline - time.monotonic())
        # A suffix keeps vLLM's ids unique even when a client reuses its X-Request-Id.
        headers = {"X-Request-Id": f"{ctx.request_id}-{uuid.uuid4().hex[:8]}"}
        upstream = await engine.open(PATHS[ctx.kind], body, headers, timeout=remaining)
        if upstream.status != 200:
            raw = await upstream.read()
            raise _upstream_error(upstream.status, raw)
        return upstream

    async def _passthrough(self, ctx: RequestContext, upstream: Upstream, target: Target,
                           headers: dict[str, str]) -> Response:  # fmt: skip
        try:
            raw = await upstream.read()
        except TimeoutError as exc:
            from governor.errors import DeadlineExceeded

            raise DeadlineExceeded("Request deadline exceeded; generation was stopped.") from exc
        data = orjson.loads(raw)
        usage = data.get("usage") or {}
        stats = RelayStats(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        self._record(ctx, stats)
        if target.upstream_model != target.public_name:
            data["model"] = target.public_name
            raw = orjson.dumps(data)
        return Response(raw, media_type="application/json", headers=headers)

    def _stream_job(self, ctx: RequestContext, relay: Relay, engine: EngineClient) -> SSEResponse:
        """The streaming response; its cleanup runs exactly once, even if the body never starts."""
        target = ctx.target
        rename = target is not None and target.upstream_model != target.public_name
        old = f'"model":"{target.upstream_model}"'.encode() if target else b""
        new = f'"model":"{target.public_name}"'.encode() if target else b""
        state = {"closed": False, "completed": False}

        async def body() -> AsyncIterator[bytes]:
            async for chunk in relay.stream():
                yield chunk.replace(old, new) if rename else chunk
            state["completed"] = True

        def close() -> None:
            if state["closed"]:
                return
            state["closed"] = True
            relay.upstream.abort()
            engine.outstanding -= 1
            if not state["completed"] and relay.stats.outcome == "ok":
                relay.stats.outcome = "disconnect"
            self._record(ctx, relay.stats)
            self._finish(ctx, relay.stats)

        return SSEResponse(body(), headers={"X-Request-Id": ctx.request_id}, on_close=close)

    def _record(self, ctx: RequestContext, stats: RelayStats) -> None:
        m, label = self.metrics, ctx.label
        ctx.tokens = stats.prompt_tokens + stats.completion_tokens
        if stats.prompt_tokens:
            m.prompt_tokens.labels(label).inc(stats.prompt_tokens)
        if stats.completion_tokens:
            m.output_tokens.labels(label).inc(stats.completion_tokens)
        if stats.first_token_at is not None:
            m.ttft.labels(label, ctx.kind).observe(stats.first_token_at - ctx.started)
        if stats.loops_cut:
            m.loops_cut.labels(label).inc(stats.loops_cut)
        if stats.outcome == "deadline":
            ctx.status = 504
        elif stats.outcome == "error":
            ctx.status = 503

    def _finish(self, ctx: RequestContext, stats: RelayStats | None) -> None:
        elapsed = time.monotonic() - ctx.started
        self.metrics.in_flight.dec()
        if ctx.quota_id is not None and self.quotas is not None:
            self.quotas.release(ctx.quota_id, ctx.tokens)
        self.metrics.requests.labels(ctx.label, ctx.kind, str(ctx.status)).inc()
        self.metrics.latency.labels(ctx.label, ctx.kind).observe(elapsed)
        if ctx.target is not None:
            ctx.target.done()
        log.info(
            "request done",
            extra={"request_id": ctx.request_id, "endpoint": ctx.kind, "model": ctx.label, "status": ctx.status,
                   "seconds": round(elapsed, 4), "outcome": stats.outcome if stats else None},
        )  # fmt: skip


def _upstream_error(status: int, raw: bytes) -> GovernorError:
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
