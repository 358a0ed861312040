"""Admin routes for adapters: list, load, unload, pin. Behind the admin key; thin over the registry."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from governor.api.body import read_json
from governor.api.deps import admin_auth
from governor.errors import Forbidden, from_pydantic
from governor.lora.registry import AdapterRegistry

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_auth)])
# Mounted instead of `router` when the admin API is off: it answers before any body is read.
disabled = APIRouter(include_in_schema=False)
MAX_ADMIN_BODY = 64 * 1024


@disabled.api_route("/admin/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def admin_off(rest: str) -> None:
    raise Forbidden("The admin API is off. Set GOVERNOR_ADMIN_KEY to turn it on.", code="admin_disabled")


async def get_registry(request: Request) -> AdapterRegistry:
    registry: AdapterRegistry = request.app.state.registry
    return registry


RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]


class LoadAdapter(BaseModel):
    """POST /admin/adapters: register an adapter under a name and load it (or only register it)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Model name clients will send.")
    path: str = Field(
        min_length=1, max_length=4096,
        description="Folder relative to the adapters root, or an object-store folder: s3://BUCKET/PREFIX/NAME or "
        "file:///ABSOLUTE/PATH (fetched, validated and staged like a dropped folder).",
    )  # fmt: skip
    pin: bool | None = Field(None, description="Keep it loaded (never evicted); omitted = unchanged.")
    load: bool = Field(True, description="Load it now; false = register only (checked for form, loaded on first use).")


@router.get("/adapters")
async def list_adapters(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": registry.list()}


def _load_doc() -> dict[str, Any]:
    schema = LoadAdapter.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@router.post("/adapters", openapi_extra=_load_doc())
async def load_adapter(request: Request, registry: RegistryDep) -> dict[str, Any]:
    # The body is read here, after the router's auth dependency, and bounded: FastAPI would read a
    # declared body parameter whole before any dependency runs.
    try:
        body = LoadAdapter.model_validate(await read_json(request, MAX_ADMIN_BODY))
    except ValidationError as exc:
        raise from_pydantic(exc.errors()) from exc
    return await registry.load(body.name, body.path, pin=body.pin, now=body.load)


@router.delete("/adapters/{name}")
async def unload_adapter(name: str, registry: RegistryDep) -> dict[str, Any]:
    return await registry.unload(name)


@router.post("/adapters/{name}/pin")
async def pin_adapter(name: str, registry: RegistryDep) -> dict[str, Any]:
    return await registry.pin(name, True)


@router.post("/adapters/{name}/unpin")
async def unpin_adapter(name: str, registry: RegistryDep) -> dict[str, Any]:
    return await registry.pin(name, False)
