"""One request's scope: everything a request holds is acquired through it and released in one place.

The quota lease, the engine lease (sequences on one engine), the adapter-version lease and the open
upstream response are registered on the scope as they are taken; `close` gives them all back, records
the outcome (every one, 4xx included) and logs it. A streaming response takes the scope over
(`detach`) and closes it when the stream ends, however it ends."""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

from governor.endpoint import Endpoint
from governor.errors import ClientGone, DeadlineExceeded, GovernorError, InvalidRequest
from governor.metrics.gateway import GatewayMetrics
from governor.metrics.model_server import Flight
from governor.serving.quota import QuotaLease
from governor.stream.relay import RelayStats
from governor.target import Target

log = logging.getLogger("governor.requests")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(raw: str | None) -> str:
    """The client's X-Request-Id when it is plain (`[A-Za-z0-9._:-]{1,128}`), else a fresh one: ids go
    into logs and upstream headers, where spaces or `=` could forge fields."""
    if raw is not None and REQUEST_ID.fullmatch(raw):
        return raw
    fresh = uuid.uuid4().hex
    if raw is not None:
        # The original as a Python literal (first 64 characters) with spaces and '=' escaped too, so that
        # it cannot pass for more key=value fields in the log line.
        original = ascii(raw[:64]).replace(" ", "\\x20").replace("=", "\\x3d")
        log.warning("X-Request-Id replaced", extra={"request_id": fresh, "original": original})
    return fresh


@dataclass
class ClientInfo:
    """What the HTTP layer tells the service about the caller (the service never sees a Starlette request)."""

    request_id: str | None  # as sent; sanitised by the scope
    key: str | None  # the API key presented (already authenticated when keys are configured)
    address: str | None
    timeout: str | None  # X-Governor-Timeout as sent
    disconnected: Callable[[], Awaitable[None]] = field(repr=False)  # resolves when the client leaves


class RequestScope:
    """`async with service.scope(endpoint, client) as scope:` around one generation request."""

    def __init__(self, endpoint: Endpoint, client: ClientInfo, metrics: GatewayMetrics, max_timeout: float) -> None:
        self.endpoint = endpoint
        self.client = client
        self.metrics = metrics
        self.max_timeout = max_timeout
        self.request_id = request_id(client.request_id)
        self.started = time.monotonic()
        self.deadline = self.started + max_timeout
        self.label = "other"
        self.status = 200
        self.target: Target | None = None
        self.stats: RelayStats | None = None
        self.quota: QuotaLease | None = None
        self.prompt_estimate = 0  # the prompt's cost in tokens as admission estimated it
        self.answer_is_usage = False  # a non-streamed engine call: only its complete answer says what it cost
        self.flight: Flight | None = None  # waiting → running → ended, for the model-server series
        self._held = contextlib.ExitStack()  # engine lease, upstream abort, adapter lease
        self._detached = False
        self._closed = False

    async def __aenter__(self) -> RequestScope:
        self.metrics.in_flight.inc()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.detach_undo()
            if isinstance(exc, GovernorError):
                self.status = exc.status
                if exc.status >= 500:
                    log.warning("request failed: %s", exc.message, extra={"request_id": self.request_id})
            elif isinstance(exc, Exception):
                self.status = 500
            else:  # cancelled: the server is going away or the client left
                self.status = ClientGone.status
        if not self._detached:
            self.close()

    def apply_timeout(self) -> None:
        """The server's deadline, or a shorter one the client asks for with X-Governor-Timeout (seconds)."""
        asked = self.client.timeout
        if asked is None:
            return
        try:
            value = float(asked)
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise InvalidRequest("X-Governor-Timeout must be a positive number of seconds.", param="X-Governor-Timeout")
        self.deadline = self.started + min(value, self.max_timeout)

    def remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def hold(self, target: Target) -> None:
        """Take over a resolved target's adapter-version lease."""
        self.target = target
        self._held.callback(target.done)

    def enter(self, lease: contextlib.AbstractContextManager[object]) -> object:
        """Hold a lease (a context manager) until the scope closes."""
        return self._held.enter_context(lease)

    def admitted(self) -> None:
        """The request goes to an engine: it counts as waiting until `first_token`, until the scope closes."""
        self.flight = self.metrics.flights.admit(self.target.adapter if self.target else None)
        self._held.callback(self.flight.end)

    def first_token(self) -> None:
        if self.flight is not None:
            self.flight.started()

    def on_close(self, release: Callable[[], None]) -> None:
        self._held.callback(release)

    def detach(self) -> Callable[[], None]:
        """A streaming response takes the scope over: it calls the returned close when the stream ends."""
        self._detached = True
        return self.close

    def detach_undo(self) -> None:
        """The response that took the scope over never reached the client: the scope closes itself again."""
        self._detached = False

    def close(self) -> None:
        """The one release: every lease, then the outcome in metrics and the log. Runs once."""
        if self._closed:
            return
        self._closed = True
        stats = self.stats
        try:
            self._held.close()
        finally:
            if self.quota is not None:
                self.quota.release(self._cost(self.quota, stats))
            self._finish(stats)

    def _cost(self, quota: QuotaLease, stats: RelayStats | None) -> int:
        """Tokens the request is charged, however it ended. The engine's usage when it reported any; else what
        was relayed (one token an event) and the prompt estimate: a stream's usage comes last, and a client that
        hangs up before it must still pay for what it got. A non-streamed answer that never came, because the
        client left or the deadline passed, keeps its admission charge: nothing shows it cost less. Refused or
        lost by the engine: nothing."""
        if stats is not None:
            return stats.prompt_tokens + stats.completion_tokens if stats.usage_seen else (
                self.prompt_estimate + stats.events)  # fmt: skip
        if self.answer_is_usage and self.status in (ClientGone.status, DeadlineExceeded.status):
            return quota.charged
        return 0

    def _finish(self, stats: RelayStats | None) -> None:
        elapsed = time.monotonic() - self.started
        m, kind = self.metrics, self.endpoint.kind
        m.in_flight.dec()
        m.requests.labels(self.label, kind, str(self.status)).inc()
        m.latency.labels(self.label, kind).observe(elapsed)
        log.info(
            "request done",
            extra={"request_id": self.request_id, "endpoint": kind, "model": self.label, "status": self.status,
                   "seconds": round(elapsed, 4), "outcome": stats.outcome if stats else None},
        )  # fmt: skip

    def record(self, stats: RelayStats) -> None:
        """What the relay saw: tokens, TTFT and loops to metrics; a stream's failure to the status."""
        self.stats = stats
        m, label = self.metrics, self.label
        if stats.prompt_tokens:
            m.prompt_tokens.labels(label).inc(stats.prompt_tokens)
        if stats.completion_tokens:
            m.output_tokens.labels(label).inc(stats.completion_tokens)
        if stats.first_token_at is not None:
            m.ttft.labels(label, self.endpoint.kind).observe(stats.first_token_at - self.started)
        if stats.loops_cut:
            m.loops_cut.labels(label).inc(stats.loops_cut)
        if stats.outcome == "deadline":
            self.status = 504
        elif stats.outcome == "error":
            self.status = 503
