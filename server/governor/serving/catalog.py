"""Which models Governor serves, in one place: the base model (for a merged one, what it was made from)
and every registered adapter. It lists them (/v1/models), resolves a request's ``model`` to a target
and bounds the metrics' model labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from governor.engine.pool import EnginePool
from governor.errors import ModelNotFound
from governor.lora.merge import PUBLIC_PROVENANCE
from governor.lora.registry import AdapterRegistry
from governor.target import Target


class ModelCatalog:
    """The models one gateway serves: its engine pool's model and the adapters registered with it."""

    def __init__(self, pool: EnginePool, adapters: AdapterRegistry | None, max_model_len: int, created: float,
                 provenance: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.pool = pool
        self.adapters = adapters
        self.max_model_len = max_model_len
        self.created = int(created)
        self.provenance = dict(provenance) if provenance else None  # a merged model's `governor adapters merge` record

    def names(self) -> set[str]:
        """Every model name a request may carry (the base and every registered adapter)."""
        names = {self.pool.served_model}
        if self.adapters is not None:
            names.update(self.adapters.known_names())
        return names

    def cards(self, *, admin: bool) -> list[dict[str, Any]]:
        """The base model and every registered adapter (with the base as parent), with its state and tier: a
        request for one that is not loaded loads it (waiting for room when the engines are full). Server
        paths in a merged model's record reach only an admin."""
        base, created = self.pool.served_model, self.created
        cards = [{"id": base, "object": "model", "created": created, "owned_by": "governor", "root": base,
                  "parent": None, "max_model_len": self.max_model_len}]  # fmt: skip
        if self.provenance:
            shown = (
                self.provenance if admin else {k: self.provenance[k] for k in PUBLIC_PROVENANCE if k in self.provenance}
            )
            cards[0]["governor_merge"] = shown
        if self.adapters is not None:
            for name, state, tier in self.adapters.listed():
                cards.append({"id": name, "object": "model", "created": created, "owned_by": "governor",
                              "root": name, "parent": base, "state": state, "tier": tier})  # fmt: skip
        return [c for c in cards if c["id"]]

    def card(self, name: str, *, admin: bool) -> dict[str, Any]:
        for card in self.cards(admin=admin):
            if card["id"] == name:
                return card
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")

    async def resolve(self, name: str, wait: float | None = None) -> Target:
        """The target `name` names; an adapter not in the engines is loaded, waiting up to `wait` s for room."""
        base = self.pool.served_model
        if name == base:
            return Target(public_name=name, upstream_model=name)
        if self.adapters is not None:
            target = await self.adapters.target(name, wait)
            if target is not None:
                return target
        known = f" Available: '{base}'." if base else ""
        raise ModelNotFound(f"The model '{name}' does not exist.{known}", param="model")
