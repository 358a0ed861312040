"""Annotated dependencies: routes declare what they need, app.state provides it.

All async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per dependency per
request (it showed up in the relay profile); none of these block."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from governor.api import auth
from governor.api.auth import presented_key
from governor.engine.pool import EnginePool
from governor.serving.readiness import Readiness
from governor.serving.service import ClientInfo, GenerationService
from governor.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_pool(request: Request) -> EnginePool:
    pool: EnginePool = request.app.state.pool
    return pool


async def get_service(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.service
    return service


async def get_readiness(request: Request) -> Readiness:
    readiness: Readiness = request.app.state.readiness
    return readiness


async def get_client(request: Request) -> ClientInfo:
    """The caller as the service sees it, with a way to learn that it left."""
    receive = request.receive

    async def disconnected() -> None:
        # Called only once the body has been read: the next ASGI message is the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass

    headers = request.headers
    address = request.client.host if request.client else None
    return ClientInfo(headers.get("x-request-id"), presented_key(headers), address, headers.get("x-governor-timeout"),
                      disconnected)  # fmt: skip


SettingsDep = Annotated[Settings, Depends(get_settings)]
PoolDep = Annotated[EnginePool, Depends(get_pool)]
ServiceDep = Annotated[GenerationService, Depends(get_service)]
ReadinessDep = Annotated[Readiness, Depends(get_readiness)]
ClientDep = Annotated[ClientInfo, Depends(get_client)]


async def user_auth(request: Request, settings: SettingsDep) -> None:
    auth.check_user(settings, request)


async def admin_auth(request: Request, settings: SettingsDep) -> None:
    auth.check_admin(settings, request)


async def metrics_auth(request: Request, settings: SettingsDep) -> None:
    auth.check_metrics(settings, request)
