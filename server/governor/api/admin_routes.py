"""Admin routes for adapters: list, load, unload, pin. Behind the admin key; thin over the registry."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from governor.api.deps import admin_auth
from governor.lora.registry import AdapterRegistry

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_auth)])


async def get_registry(request: Request) -> AdapterRegistry:
    registry: AdapterRegistry = request.app.state.registry
    return registry


RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]


class LoadAdapter(BaseModel):
    """POST /admin/adapters: register an adapter folder under a name and load it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Model name clients will send.")
    path: str = Field(min_length=1, max_length=4096, description="Folder relative to the adapters root.")
    pin: bool | None = Field(None, description="Keep it loaded (never evicted); omitted = unchanged.")


@router.get("/adapters")
async def list_adapters(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": registry.list()}


@router.post("/adapters")
async def load_adapter(body: LoadAdapter, registry: RegistryDep) -> dict[str, Any]:
    return await registry.load(body.name, body.path, pin=body.pin)


@router.delete("/adapters/{name}")
async def unload_adapter(name: str, registry: RegistryDep) -> dict[str, Any]:
    return await registry.unload(name)


@router.post("/adapters/{name}/pin")
async def pin_adapter(name: str, registry: RegistryDep) -> dict[str, Any]:
    return await registry.pin(name, True)


@router.post("/adapters/{name}/unpin")
async def unpin_adapter(name: str, registry: RegistryDep) -> dict[str, Any]:
    return await registry.pin(name, False)
