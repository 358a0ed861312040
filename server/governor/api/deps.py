"""Annotated dependencies: routes declare what they need, app.state provides it.

All async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per dependency per
request (it showed up in the relay profile); none of these block."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from governor.api import auth
from governor.engine.pool import EnginePool
from governor.readiness import Readiness
from governor.serving import GenerationService
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


SettingsDep = Annotated[Settings, Depends(get_settings)]
PoolDep = Annotated[EnginePool, Depends(get_pool)]
ServiceDep = Annotated[GenerationService, Depends(get_service)]
ReadinessDep = Annotated[Readiness, Depends(get_readiness)]


async def user_auth(request: Request, settings: SettingsDep) -> None:
    auth.check_user(settings, request)


async def admin_auth(request: Request, settings: SettingsDep) -> None:
    auth.check_admin(settings, request)


async def metrics_auth(request: Request, settings: SettingsDep) -> None:
    auth.check_metrics(settings, request)
