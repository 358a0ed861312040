"""create_app(settings, pool): the one place the gateway is assembled. State lives on app.state."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI
from prometheus_client import disable_created_metrics

from governor.api import admin_routes, openai_routes, ops_routes, relay_routes, ui_routes
from governor.api.errors import install_handlers
from governor.engine.pool import EnginePool
from governor.lora.registry import AdapterRegistry
from governor.metrics.engine import EngineScraper
from governor.metrics.gateway import EngineCollector, GatewayMetrics
from governor.metrics.gpu import GpuCollector
from governor.metrics.model_server import ModelServerSeries
from governor.policy.builder import Policy
from governor.runtime.relay_workers import RelayWorkers
from governor.serving.catalog import ModelCatalog
from governor.serving.quota import Quotas
from governor.serving.readiness import PROBE_REQUEST, Readiness
from governor.serving.service import GenerationService
from governor.serving.tickets import Tickets
from governor.settings import Settings
from governor.ui.status import StatusReader

log = logging.getLogger("governor")


def create_app(settings: Settings, pool: EnginePool, policy: Policy, registry: AdapterRegistry | None = None,
               provenance: Mapping[str, Any] | None = None, relay: RelayWorkers | None = None) -> FastAPI:  # fmt: skip
    """Assemble the gateway around an engine pool, a decoding policy and (optionally) the adapter registry;
    ``provenance``: what a merged base model was made from (shown on /v1/models); ``relay``: the relay workers
    this gateway owns, if any."""
    disable_created_metrics()  # `_created` series double the exposition and no dashboard reads them
    metrics = GatewayMetrics()
    gpu = GpuCollector(metrics.total_output_tokens)
    metrics.registry.register(gpu)
    metrics.registry.register(EngineCollector(lambda: pool.engines))
    adapters = registry.slots if registry is not None else lambda: ()
    loading = registry.waiting_by_name if registry is not None else dict
    model_server = ModelServerSeries(
        metrics.flights, lambda: pool.served_model, settings.max_loras if settings.lora else None, adapters, loading
    )
    engine_scraper = EngineScraper(model_server=model_server)
    if registry is not None:
        metrics.registry.register(registry.metrics)
    started_at = time.time()
    catalog = ModelCatalog(pool, registry, settings.max_model_len, started_at, provenance)
    metrics.bound_labels(catalog.names)
    tickets = Tickets(pool, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gpu.start()  # read from startup, not from the first scrape: that scrape then has a reading
        await pool.start()
        if registry is not None:
            await registry.start()
        if relay is not None:
            await relay.start(tickets)
        try:
            yield
        finally:
            if relay is not None:
                await relay.stop()
            if registry is not None:
                await registry.stop()
            await engine_scraper.close()
            await pool.stop()
            gpu.close()

    # The schema and its pages are off unless enabled: they map the attack surface for anyone.
    # `app.openapi()` works in-process either way (the fuzz tests read it there).
    docs: dict[str, Any] = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Governor", version="0.1.0", lifespan=lifespan, **docs)
    app.state.settings = settings
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.engine_scraper = engine_scraper
    app.state.registry = registry
    app.state.started_at = started_at
    app.state.catalog = catalog
    app.state.tickets = tickets
    app.state.readiness = Readiness(
        pool,
        settings.ready_cache_seconds,
        probe_body=lambda: policy.build(dict(PROBE_REQUEST), kind="completions").body,
        degraded=policy.info.degraded(),
    )
    quotas = Quotas(settings.key_rpm, settings.key_tpm, settings.key_concurrency, settings.address_concurrency)
    app.state.service = GenerationService(settings, pool, policy, metrics, catalog, quotas)
    install_handlers(app)
    _document_request_models(app)
    app.include_router(openai_routes.router)
    app.include_router(ops_routes.router)
    if relay is not None:
        app.state.relay_token = relay.token
        app.include_router(relay_routes.router)
    if registry is not None and settings.admin_key:
        app.include_router(admin_routes.router)
    else:  # no admin key, no admin API: not even a body is read
        app.include_router(admin_routes.disabled)
    if settings.ui:
        app.state.ui_status = StatusReader(settings, pool, registry, metrics, gpu)
        app.include_router(ui_routes.build_router())
    return app


def _document_request_models(app: FastAPI) -> None:
    """Routes read raw bodies (for exact pass-through), so their models are added to the schema here."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in openai_routes.DOCUMENTED_MODELS:
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
