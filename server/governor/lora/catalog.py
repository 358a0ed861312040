"""The registered adapters by name and what the service, the metrics and /v1/models read of them.

``AdapterRegistry`` (registry.py) derives from it and adds everything that changes an adapter.
"""

from __future__ import annotations

from governor.errors import AdapterNotFound, Conflict
from governor.lora.adapter import Adapter, AdapterState

READY = AdapterState.READY


class AdapterCatalog:
    """Registered adapters by name, read without a lock (single event loop)."""

    def __init__(self) -> None:
        self._adapters: dict[str, Adapter] = {}

    def waiting(self) -> int:
        """Requests waiting now for their adapter to be loaded (counted in the metrics and the picker's queue)."""
        return sum(a.waiting for a in self._adapters.values())

    def waiting_by_name(self) -> dict[str, int]:
        return {n: a.waiting for n, a in self._adapters.items() if a.waiting}

    def ready_names(self) -> list[str]:
        return sorted(n for n, a in self._adapters.items() if a.state == READY)

    def servable_names(self) -> list[str]:
        """Names a request may use now: ready ones and those loaded on demand (not failed or going away)."""
        gone = (AdapterState.FAILED, AdapterState.UNLOADING)
        return sorted(n for n, a in self._adapters.items() if a.state not in gone)

    def listed(self) -> list[tuple[str, str, str]]:
        """(name, state, tier) of every registered adapter not going away, by name: /v1/models."""
        gone = AdapterState.UNLOADING
        return [(n, a.state.value, a.tier) for n, a in sorted(self._adapters.items()) if a.state != gone]

    def slots(self) -> list[tuple[str, bool, bool]]:
        """(name, loaded on the engines, pinned) per registered adapter: the model-server series."""
        return [(n, a.state == READY, a.pinned) for n, a in self._adapters.items()]

    def known_names(self) -> list[str]:
        """Every registered name (bounds metric label values)."""
        return sorted(self._adapters)

    def _get(self, name: str) -> Adapter:
        a = self._adapters.get(name)
        if a is None:
            raise AdapterNotFound(f"Adapter '{name}' is not registered.", param="name")
        return a

    def _failed(self, a: Adapter) -> Conflict:
        hint = " (or fix its folder: watched folders reload when they change)" if a.source == "watch" else ""
        return Conflict(
            f"Adapter '{a.name}' failed to load: {a.reason}; fix it and POST /admin/adapters again{hint}.",
            param="model",
            code="adapter_failed",
        )
