"""OpenAI routes: thin wrappers around the generation service and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from governor.api import auth
from governor.api.auth import presented_key
from governor.api.body import read_json
from governor.api.deps import ClientDep, ServiceDep, SettingsDep, user_auth
from governor.api.sse_response import to_response
from governor.endpoint import ENDPOINTS, Kind
from governor.serving.catalog import ModelCatalog
from governor.serving.request import ChatCompletionRequest, CompletionRequest, parse_request

router = APIRouter(prefix="/v1", tags=["openai"])


# Request models documented in the OpenAPI schema; their nested models go to components (app.py).
DOCUMENTED_MODELS = (ChatCompletionRequest, CompletionRequest)


def _body_doc(model: type[Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _catalog(request: Request) -> tuple[ModelCatalog, bool]:
    admin = auth.is_admin(request.app.state.settings, presented_key(request.headers))
    return request.app.state.catalog, admin


@router.get("/models", dependencies=[Depends(user_auth)])
async def list_models(request: Request) -> dict[str, Any]:
    catalog, admin = _catalog(request)
    return {"object": "list", "data": catalog.cards(admin=admin)}


@router.get("/models/{model:path}", dependencies=[Depends(user_auth)])
async def get_model(model: str, request: Request) -> dict[str, Any]:
    catalog, admin = _catalog(request)
    return catalog.card(model, admin=admin)


async def _generate(kind: Kind, request: Request, service: ServiceDep, client: ClientDep,
                    settings: SettingsDep) -> Response:  # fmt: skip
    # The scope opens first, so that every outcome (a refused key, a malformed body) is counted.
    async with service.scope(ENDPOINTS[kind], client) as scope:
        auth.check_user(settings, request)  # before the body is read
        req = parse_request(kind, await read_json(request, settings.max_body_bytes), settings)
        return to_response(await service.generate(scope, req))


@router.post("/chat/completions", openapi_extra=_body_doc(ChatCompletionRequest))
async def chat_completions(request: Request, service: ServiceDep, client: ClientDep, settings: SettingsDep) -> Response:
    return await _generate("chat", request, service, client, settings)


@router.post("/completions", openapi_extra=_body_doc(CompletionRequest))
async def completions(request: Request, service: ServiceDep, client: ClientDep, settings: SettingsDep) -> Response:
    return await _generate("completions", request, service, client, settings)
