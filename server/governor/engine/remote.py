"""RemoteEngine: an HTTP client for one vLLM OpenAI server, with health tracking.

aiohttp rather than httpx on the hot path: httpx parses chunked transfer encoding in pure Python
(h11), which capped an SSE relay at ~0.5x of direct; aiohttp's C parser does not.
"""

from __future__ import annotations

import asyncio
import logging
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


class HttpUpstream:
    """An open aiohttp response to relay."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    async def chunks(self) -> AsyncIterator[bytes]:
        # iter_any hands over whatever bytes have arrived: several SSE events per read under load,
        # which is what keeps the relay's per-event cost low.
        async for data in self._response.content.iter_any():
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
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.state = EngineState.STARTING
        self.outstanding = 0
        self.generation = 0
        self._hooks: list[ReadyHook] = []
        self._session: aiohttp.ClientSession | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------

    def on_ready(self, hook: ReadyHook) -> None:
        """Run hook each time the engine becomes ready (first start and every restart)."""
        self._hooks.append(hook)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector
            if self.socket_path:
                connector = aiohttp.UnixConnector(path=str(self.socket_path), limit=0, force_close=False)
            else:
                connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
            # The key goes on every call, /health and /metrics included (a remote engine may guard them).
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False, headers=self._auth
            )
        return self._session

    async def start(self) -> None:
        self._monitor = asyncio.create_task(self._watch_health(), name=f"health-{self.name}")

    async def stop(self) -> None:
        self.state = EngineState.STOPPED
        if self._monitor:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        if self._session:
            await self._session.close()

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

    async def _watch_health(self) -> None:
        failures = 0
        while self.state != EngineState.STOPPED:
            ok = await self.health()
            if ok:
                failures = 0
                if self.state != EngineState.READY:
                    await self._became_ready()
            else:
                failures += 1
                if failures >= HEALTH_FAILURES_DOWN and self.state == EngineState.READY:
                    self._went_down("health check failing")
            await asyncio.sleep(HEALTH_INTERVAL)

    # -- requests ----------------------------------------------------------------------------------

    async def open(
        self, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float | None = None
    ) -> HttpUpstream:
        """POST body and return the response unread, for relaying; `timeout` bounds the whole exchange."""
        try:
            response = await self.session.post(
                self.base_url + path,
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json", **headers},
                timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=5),
            )
        except TimeoutError as exc:
            raise DeadlineExceeded("Request deadline exceeded before the engine answered.") from exc
        except (aiohttp.ClientError, OSError) as exc:
            self._went_down(f"request failed: {exc!r}")
            raise EngineUnavailable(f"Engine '{self.name}' is not reachable; retry shortly.") from exc
        return HttpUpstream(response)

    async def request_json(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> tuple[int, Any]:
        """A small JSON call (models, adapters); raises EngineUnavailable when unreachable."""
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                data=orjson.dumps(body) if body is not None else None,
                headers={"Content-Type": "application/json"} if body is not None else None,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                raw = await resp.read()
                try:
                    return resp.status, orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    return resp.status, raw.decode("utf-8", "replace")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
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
