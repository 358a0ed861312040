"""What a request's `model` names, as the service and the adapter registry share it.

Below both: the registry (lora/) builds Targets, the service consumes them, neither imports the other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Target:
    """The base model or an adapter version, and how to reach it upstream.

    `profile` is the adapter's decoding profile: a compiled one (`Policy.compile_profile`, checked
    when the adapter loaded) or its raw governor.json, compiled on first use. `done` releases the
    adapter-version lease; the request scope calls it exactly once."""

    public_name: str
    upstream_model: str
    adapter: str | None = None
    profile: Any = None
    engines: tuple[str, ...] = ()
    done: Callable[[], None] = field(default=lambda: None)


class AdapterResolver(Protocol):
    """The adapter registry as the service sees it."""

    async def target(self, name: str, wait: float | None = None) -> Target | None: ...
