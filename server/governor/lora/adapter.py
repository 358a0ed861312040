"""Adapter records: the state machine's states, a registered adapter and its loaded versions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Source = Literal["api", "watch"]


class AdapterState(enum.StrEnum):
    """discovered → validating → loading → ready | failed(reason) → unloading; evicted = known, not loaded."""

    DISCOVERED = "discovered"
    VALIDATING = "validating"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    EVICTED = "evicted"


def internal_name(name: str, number: int) -> str:
    """vLLM caches adapters by name, so each new set of weights gets its own upstream name."""
    return name if number == 1 else f"{name}@{number}"


@dataclass
class Version:
    """One set of weights as loaded upstream under one internal name."""

    internal: str
    number: int
    fingerprint: str  # digest of its staged copy, which it holds a reference to until unloaded
    engines: dict[str, int] = field(default_factory=dict)  # engine name → engine generation it was loaded in
    leases: int = 0  # requests in flight on this version
    retired: str | None = None  # unload reason once replaced/removed; unloaded when leases reach 0
    unloaded: bool = False
    holds_copy: bool = True  # holds a reference to its staged copy (given up when evicted or unloaded)


@dataclass
class Adapter:
    """A registered adapter. `current` stays set while evicted so an unchanged reload keeps its name."""

    name: str
    path: str
    source: Source
    folder: Path  # root / path, resolved lexically: how watcher events find their adapter
    pinned: bool = False
    state: AdapterState = AdapterState.DISCOVERED
    reason: str | None = None
    current: Version | None = None
    profile: Any = None  # governor.json as read, or compiled by the policy (AdapterLoader.compile_profile)
    loaded_at: float | None = None
    last_used: float = 0.0  # wall clock, for display
    lru: int = 0  # registry tick of the last use: eviction order, immune to clock jumps
    load_seconds: float | None = None
    loaded_once: bool = False  # only adapters that loaded at least once (or were registered by API) are persisted
    registered: bool = False  # registered by the admin API to load on first use: persisted before it loads
    waiting: int = 0  # requests waiting for this adapter to load: never evicted while any wait
    origin: str | None = None  # object-store URL (s3://, file://) it is fetched from; None: a folder under the root
    origin_version: str | None = None  # the store's version (ETags) of the files last validated

    @property
    def tier(self) -> str:
        """Where it lives: `engine` (registered in the engines, LRU unless pinned) or `registry` (known only)."""
        return "engine" if self.state == AdapterState.READY else "registry"

    def describe(self) -> dict[str, Any]:
        """The admin API's view."""
        v = self.current
        return {
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "pinned": self.pinned,
            "path": self.path,
            "source": self.source,
            "version": v.number if v else None,
            "upstream_name": v.internal if v else None,
            "engines": sorted(v.engines) if v and self.state == AdapterState.READY else [],
            "in_flight": v.leases if v else 0,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used or None,
            "load_seconds": self.load_seconds,
            "tier": self.tier,
            "waiting": self.waiting,
            "source_version": self.origin_version,
        }

    def persisted(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "pinned": self.pinned, "source": self.source}
