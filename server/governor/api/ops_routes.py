"""Operator routes: liveness, readiness, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from governor.api.deps import PoolDep, ReadinessDep, metrics_auth
from governor.errors import EngineUnavailable

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The gateway process is alive (it says nothing about the engine: see /ready)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(readiness: ReadinessDep, pool: PoolDep) -> dict[str, Any]:
    ok, why = await readiness.check()
    if not ok:
        raise EngineUnavailable(f"Not ready: {why}.", code="not_ready")
    body: dict[str, Any] = {"status": "ready", "engines": {e.name: e.state.value for e in pool.engines}}
    if readiness.degraded:
        body["degraded"] = readiness.degraded
    return body


@router.get("/metrics", dependencies=[Depends(metrics_auth)])
async def metrics(request: Request, pool: PoolDep) -> Response:
    merged = await request.app.state.engine_scraper.scrape(pool.engines)
    return Response(request.app.state.metrics.render() + merged.encode(), media_type=CONTENT_TYPE_LATEST)
