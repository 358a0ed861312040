"""OpenAI routes: thin wrappers around the generation service and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from governor.api import auth
from governor.api.auth import presented_key
from governor.api.body import read_json
from governor.api.deps import ClientDep, ServiceDep, SettingsDep, user_auth
from governor.endpoint import ENDPOINTS, Kind
from governor.errors import ModelNotFound
from governor.lora.merge import PUBLIC_PROVENANCE
from governor.request import ChatCompletionRequest, CompletionRequest, parse_request

router = APIRouter(prefix="/v1", tags=["openai"])


# Request models documented in the OpenAPI schema; their nested models go to components (app.py).
DOCUMENTED_MODELS = (ChatCompletionRequest, CompletionRequest)


def _body_doc(model: type[Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def model_cards(request: Request) -> list[dict[str, Any]]:
    """The base model and every registered adapter (with the base as parent), with its state and tier: a
    request for one that is not loaded loads it (waiting for room when the engines are full)."""
    pool = request.app.state.pool
    base = pool.served_model
    created = int(request.app.state.started_at)
    cards = [{"id": base, "object": "model", "created": created, "owned_by": "governor", "root": base,
              "parent": None, "max_model_len": request.app.state.settings.max_model_len}]  # fmt: skip
    provenance = getattr(request.app.state, "model_provenance", None)
    if provenance:  # a merged model (`governor adapters merge`) says what it was made from
        if not auth.is_admin(request.app.state.settings, presented_key(request.headers)):
            provenance = {k: provenance[k] for k in PUBLIC_PROVENANCE if k in provenance}  # no server paths
        cards[0]["governor_merge"] = provenance
    registry = getattr(request.app.state, "registry", None)
    if registry is not None:
        for name, state, tier in registry.listed():
            cards.append({"id": name, "object": "model", "created": created, "owned_by": "governor",
                          "root": name, "parent": base, "state": state, "tier": tier})  # fmt: skip
    return [c for c in cards if c["id"]]


@router.get("/models", dependencies=[Depends(user_auth)])
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": model_cards(request)}


@router.get("/models/{model:path}", dependencies=[Depends(user_auth)])
async def get_model(model: str, request: Request) -> dict[str, Any]:
    for card in model_cards(request):
        if card["id"] == model:
            return card
    raise ModelNotFound(f"The model '{model}' does not exist.", param="model")


async def _generate(kind: Kind, request: Request, service: ServiceDep, client: ClientDep,
                    settings: SettingsDep) -> Response:  # fmt: skip
    # The scope opens first, so that every outcome (a refused key, a malformed body) is counted.
    async with service.scope(ENDPOINTS[kind], client) as scope:
        auth.check_user(settings, request)  # before the body is read
        req = parse_request(kind, await read_json(request, settings.max_body_bytes), settings)
        return await service.generate(scope, req)


@router.post("/chat/completions", openapi_extra=_body_doc(ChatCompletionRequest))
async def chat_completions(request: Request, service: ServiceDep, client: ClientDep, settings: SettingsDep) -> Response:
    return await _generate("chat", request, service, client, settings)


@router.post("/completions", openapi_extra=_body_doc(CompletionRequest))
async def completions(request: Request, service: ServiceDep, client: ClientDep, settings: SettingsDep) -> Response:
    return await _generate("completions", request, service, client, settings)
