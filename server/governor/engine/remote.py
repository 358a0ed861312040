"""RemoteEngine: an HTTP client for one vLLM OpenAI server, with health tracking.

aiohttp rather than httpx on the hot path: httpx parses chunked transfer encoding in pure Python
(h11), which capped an SSE relay at ~0.5x of direct; aiohttp's C parser does not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from governor.engine.base import EngineState, ReadyHook
from governor.errors import DeadlineExceeded, EngineUnavailable

log = logging.getLogger("governor.engine")

HEALTH_INTERVAL = 0.5
# Consecutive failed health checks before an engine whose process still runs is declared down.
HEALTH_FAILURES_DOWN = 3
# vLLM's uvicorn closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); aiohttp would keep it
# 15 s. Dropping idle connections first makes the keep-alive race (the server closes an idle connection
# just as the client reuses it) rare; _send retries the cases that remain.
KEEPALIVE = 4.0


class _Attempt:
    """What aiohttp's tracing said about one attempt: whether it went out on a pooled, reused connection."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


async def _note_reuse(_session: aiohttp.ClientSession, ctx: Any, _params: object) -> None:
    if isinstance(ctx.trace_request_ctx, _Attempt):  # only _send asks; other calls pass no context
        ctx.trace_request_ctx.reused = True


def safe_to_resend(exc: BaseException, attempt: _Attempt) -> bool:
    """Whether a failed attempt may be sent once more, on a fresh connection.

    Envoy's `connect-failure` plus the keep-alive case of RFC 9112 section 9.3.1, not Envoy's `reset`:
    - the connection could not be made (refused, no socket): nothing was sent;
    - a pooled connection that had sat idle failed before any answer (ServerDisconnected, or a reset as
      the request was written): the usual cause is the server closing it as idle just as we reused it,
      before it read a request on it. Should the server have read it after all, it sees that socket
      closed and aborts that copy (vLLM aborts a request whose client is gone), so the cost is a few
      wasted tokens, never a second answer to the client; each resend is logged. Adapter loads and
      unloads are safe to repeat (lora/upstream.py treats "already loaded" and 404 as done).
    A fresh connection that fails is not resent: that engine read the request and may be generating or
    dying, and a duplicate there would be silent work on a failing engine.
    """
    if isinstance(exc, aiohttp.ClientConnectorError):
        return True
    return attempt.reused and isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))


class HttpUpstream:
    """An open aiohttp response to relay; each read tells its engine it was heard from."""

    def __init__(self, response: aiohttp.ClientResponse, engine: RemoteEngine) -> None:
        self._response = response
        self._engine = engine
        self.status = response.status

    async def chunks(self) -> AsyncIterator[bytes]:
        # iter_any hands over whatever bytes have arrived: several SSE events per read under load,
        # which is what keeps the relay's per-event cost low.
        engine = self._engine
        async for data in self._response.content.iter_any():
            engine.heard_at = time.monotonic()
            yield data

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        finally:
            self._response.release()

    def abort(self) -> None:
        # A response read to its end gives its connection back to the pool; any other is closed:
        # closing the socket is what makes vLLM abort the request and free its KV cache.
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


class RemoteEngine:
    """A vLLM server reached by URL; also the base of the local process supervisor."""

    def __init__(
        self, name: str, base_url: str, served_model: str = "", api_key: str = "", socket_path: Path | None = None
    ) -> None:
        """api_key: sent as a bearer token on every call; socket_path: reach the server over this Unix socket
        (base_url then only names the host in the request line)."""
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.served_model = served_model
        self.socket_path = socket_path
        self.api_key = api_key
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.state = EngineState.STARTING
        self.outstanding = 0
        self.generation = 0
        self.heard_at = -HEALTH_INTERVAL  # monotonic time of the latest streamed bytes from this engine
        self._hooks: list[ReadyHook] = []
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        # Set by a request that failed at the connection level: the health watcher checks at once.
        self._check_now = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------

    def on_ready(self, hook: ReadyHook) -> None:
        """Run hook each time the engine becomes ready (first start and every restart)."""
        self._hooks.append(hook)

    def _new_session(self, force_close: bool) -> aiohttp.ClientSession:
        connector: aiohttp.BaseConnector
        keepalive = None if force_close else KEEPALIVE
        if self.socket_path:
            connector = aiohttp.UnixConnector(
                path=str(self.socket_path), limit=0, force_close=force_close, keepalive_timeout=keepalive
            )
        else:
            connector = aiohttp.TCPConnector(
                limit=0, force_close=force_close, keepalive_timeout=keepalive, enable_cleanup_closed=True
            )
        trace = aiohttp.TraceConfig()
        trace.on_connection_reuseconn.append(_note_reuse)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        # The key goes on every call, /health and /metrics included (a remote engine may guard them).
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, headers=self._auth, trace_configs=[trace]
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._new_session(force_close=False)
        return self._session

    @property
    def fresh_session(self) -> aiohttp.ClientSession:
        """A session whose every request opens a new connection: for the one retry a stale pooled one earns."""
        if self._fresh is None or self._fresh.closed:
            self._fresh = self._new_session(force_close=True)
        return self._fresh

    async def start(self) -> None:
        self._monitor = asyncio.create_task(self._watch_health(), name=f"health-{self.name}")

    async def stop(self) -> None:
        self.state = EngineState.STOPPED
        if self._monitor:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        for session in (self._session, self._fresh):
            if session:
                await session.close()

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _became_ready(self) -> None:
        if not self.served_model:
            self.served_model = await self._discover_model()
        self.generation += 1
        self.state = EngineState.READY
        self._ready_event.set()
        log.info("engine ready", extra={"engine": self.name, "url": self.base_url, "generation": self.generation})
        for hook in self._hooks:
            try:
                await hook(self)
            except Exception:
                log.exception("ready hook failed", extra={"engine": self.name})

    def suspect(self, why: str) -> None:
        """A request failed at the connection level: the health watcher checks now, not at its next tick.

        One request's failure never marks the engine down by itself: under load a reset or a closed
        keep-alive connection is routine, and an engine marked down turns every other request into a 503
        until it is seen healthy again. Only the watcher decides (health checks; for a local engine also
        its process exiting), so a dead engine is still found within a few health intervals."""
        if not self._check_now.is_set() and self.state == EngineState.READY:
            log.warning("engine %s: %s; checking its health now", self.name, why, extra={"engine": self.name})
        self._check_now.set()

    async def _pause(self, until: asyncio.Future[Any] | None = None) -> None:
        """Wait one health interval, or less when a request asks for a check now (or `until` completes)."""
        if self._check_now.is_set():
            return
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._check_now.wait())}
        if until is not None:
            waits.add(until)
        try:
            await asyncio.wait(waits, timeout=HEALTH_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                if waiter is not until:
                    waiter.cancel()

    def _went_down(self, why: str) -> None:
        if self.state in (EngineState.READY, EngineState.STARTING):
            log.warning("engine down: %s", why, extra={"engine": self.name})
        if self.state != EngineState.STOPPED:
            self.state = EngineState.DOWN
        self._ready_event.clear()

    async def _discover_model(self) -> str:
        status, body = await self.request_json("GET", "/v1/models", timeout=10)
        if status == 200 and body.get("data"):
            return str(body["data"][0]["id"])
        return ""

    async def health(self, timeout: float = 2.0) -> bool:
        try:
            async with self.session.get(
                self.base_url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def checked_health(self, timeout: float = 2.0) -> bool:
        """The watcher's check: a health request, unless a stream from this ready engine brought bytes within
        the last interval (vLLM streams only while its engine core runs, so that is a passed check, and under
        load the gateway and the engine's API server stop paying for two requests a second each). A suspected
        failure (`suspect`) always asks; an engine that stops streaming is asked again within an interval."""
        if (
            self.state == EngineState.READY
            and not self._check_now.is_set()
            and time.monotonic() - self.heard_at < HEALTH_INTERVAL
        ):
            return True
        return await self.health(timeout)

    async def _watch_health(self) -> None:
        failures = 0
        while self.state != EngineState.STOPPED:
            ok = await self.checked_health()
            self._check_now.clear()  # failures seen while this check ran are answered by it
            if ok:
                failures = 0
                if self.state != EngineState.READY:
                    await self._became_ready()
            else:
                failures += 1
                if failures >= HEALTH_FAILURES_DOWN and self.state == EngineState.READY:
                    self._went_down("health check failing")
            await self._pause()

    # -- requests ----------------------------------------------------------------------------------

    async def _send(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str] | None, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        """Send one request and return its response with the headers read; retried once on a fresh connection
        when the first attempt may safely be sent again (see safe_to_resend)."""
        attempt = _Attempt()
        begin = asyncio.get_running_loop().time()
        try:
            return await self.session.request(
                method, self.base_url + path, data=data, headers=headers, timeout=timeout, trace_request_ctx=attempt
            )
        except (aiohttp.ClientError, OSError) as exc:
            if not safe_to_resend(exc, attempt):
                raise
            log.info("retrying %s on a fresh connection after %r", path, exc, extra={"engine": self.name})
        if timeout.total is not None:  # the retry gets what is left of the deadline, not a new one
            left = timeout.total - (asyncio.get_running_loop().time() - begin)
            timeout = aiohttp.ClientTimeout(total=max(left, 0.001), sock_connect=timeout.sock_connect)
        return await self.fresh_session.request(
            method, self.base_url + path, data=data, headers=headers, timeout=timeout, trace_request_ctx=_Attempt()
        )

    async def open(
        self, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float | None = None
    ) -> HttpUpstream:
        """POST body and return the response unread, for relaying; `timeout` bounds the whole exchange."""
        try:
            response = await self._send(
                "POST", path, orjson.dumps(body), {"Content-Type": "application/json", **headers},
                aiohttp.ClientTimeout(total=timeout, sock_connect=5),
            )  # fmt: skip
        except TimeoutError as exc:
            raise DeadlineExceeded("Request deadline exceeded before the engine answered.") from exc
        except (aiohttp.ClientError, OSError) as exc:
            self.suspect(f"request failed: {exc!r}")
            raise EngineUnavailable(f"Engine '{self.name}' is not reachable; retry shortly.") from exc
        return HttpUpstream(response, self)

    async def request_json(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> tuple[int, Any]:
        """A small JSON call (models, adapters); raises EngineUnavailable when unreachable."""
        try:
            response = await self._send(
                method, path, orjson.dumps(body) if body is not None else None,
                {"Content-Type": "application/json"} if body is not None else None,
                aiohttp.ClientTimeout(total=timeout),
            )  # fmt: skip
            async with response as resp:
                raw = await resp.read()
                try:
                    return resp.status, orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    return resp.status, raw.decode("utf-8", "replace")
        except TimeoutError as exc:
            raise EngineUnavailable(f"Engine '{self.name}' did not answer {path}: {exc!r}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            self.suspect(f"{path} failed: {exc!r}")
            raise EngineUnavailable(f"Engine '{self.name}' did not answer {path}: {exc!r}") from exc

    async def metrics_text(self) -> str | None:
        try:
            async with self.session.get(self.base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                if resp.status != 200:
                    return None
                return await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def probe(self, body: dict[str, Any] | None = None) -> bool:
        """A real one-token generation: readiness means the engine generates, not just listens.

        `body` is the completions body to send (the default preset's, so an engine that refuses
        Governor's processor arguments is not ready); its model is this engine's."""
        if self.state != EngineState.READY:
            return False
        body = {**(body or {"prompt": "Hi", "max_tokens": 1, "temperature": 0}), "model": self.served_model}
        try:
            status, _ = await self.request_json("POST", "/v1/completions", body, timeout=10)
        except EngineUnavailable:
            return False
        return status == 200
