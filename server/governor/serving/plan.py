"""What the relay needs once a request is admitted, as plain data, and what it needs from the request's scope.

The owner process plans; the relay runs in the owner or in a relay worker (``serving/tickets.py``), which
receives the plan as JSON and reports back through a scope of its own with the same three calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from governor.stream.loop_detector import LoopConfig
from governor.stream.relay import RelayStats


@dataclass(frozen=True, slots=True)
class RelayPlan:
    """Where an admitted request goes, what is sent, and how its answer is relayed."""

    request_id: str
    path: str  # the engine's route
    body: dict[str, Any]  # the upstream body
    engines: tuple[str, ...]  # preferred engines (adapter affinity)
    sequences: int  # of the engine's budget (prompts x n)
    kind: str
    n: int  # choices relayed
    loop: LoopConfig | None
    client_usage: bool
    client_continuous: bool
    stream: bool  # the client asked for a stream
    engine_stream: bool  # the engine is asked for one (a collected answer is streamed upstream)
    public_name: str
    upstream_model: str

    def to_json(self) -> dict[str, Any]:
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        data["loop"] = dataclasses.asdict(self.loop) if self.loop is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RelayPlan:
        loop = data.get("loop")
        return cls(**{**data, "engines": tuple(data["engines"]), "loop": LoopConfig(**loop) if loop else None})


def stats_json(stats: RelayStats) -> dict[str, Any]:
    return dataclasses.asdict(stats)


def stats_from_json(data: dict[str, Any]) -> RelayStats:
    return RelayStats(**data)


class RelayScope(Protocol):
    """What the relay reports to the request's scope: the first token, what it saw, and that it took the
    scope over (a stream closes it when it ends)."""

    def first_token(self) -> None: ...

    def record(self, stats: RelayStats) -> None: ...

    def detach(self) -> Callable[[], None]: ...
