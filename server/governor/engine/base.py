"""The engine contract: what the gateway needs from a vLLM server, local or remote."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, runtime_checkable


class EngineState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DOWN = "down"
    STOPPED = "stopped"


class Upstream(Protocol):
    """An open upstream response: status, body chunks as they arrive, and a way to abort it."""

    status: int

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    def abort(self) -> None:
        """End the exchange: stops the generation unless the response was read to its end."""


ReadyHook = Callable[["EngineClient"], Awaitable[None]]


@runtime_checkable
class EngineClient(Protocol):
    """One vLLM OpenAI server. Every route talks to engines only through this."""

    name: str
    served_model: str
    state: EngineState
    outstanding: int
    generation: int  # bumps each time the engine (re)becomes ready; adapters must be re-loaded then

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def on_ready(self, hook: ReadyHook) -> None: ...

    async def open(
        self, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float | None = None
    ) -> Upstream: ...

    async def request_json(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> tuple[int, Any]: ...

    async def metrics_text(self) -> str | None: ...

    async def probe(self, body: dict[str, Any] | None = None) -> bool: ...
