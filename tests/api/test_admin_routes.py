"""Admin routes for adapters: auth, body validation, the OpenAI error envelope, and the happy path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from governor.api import admin_routes
from governor.api.errors import install_handlers
from governor.lora.registry import AdapterRegistry
from tests.lora.factory import AdapterFactory
from tests.lora.fixtures import Engine, base_info, engine, factory, make_registry, root  # noqa: F401

KEY = "k"  # make_settings' admin key
AUTH = {"Authorization": f"Bearer {KEY}"}

Client = Callable[..., Any]


def app_for(registry: AdapterRegistry) -> FastAPI:
    """The admin router as create_app mounts it, with the one error handler."""
    app = FastAPI()
    app.state.settings = registry.settings
    app.state.registry = registry
    install_handlers(app)
    app.include_router(admin_routes.router)
    return app


@pytest_asyncio.fixture(loop_scope="function")
async def client(make_registry: Callable[..., AdapterRegistry]) -> AsyncIterator[Client]:  # noqa: F811
    """client(**settings) → an httpx client on a fresh registry's admin routes."""
    opened: list[httpx.AsyncClient] = []

    async def build(**overrides: Any) -> httpx.AsyncClient:
        registry = make_registry(**overrides)
        await registry.start()
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app_for(registry)), base_url="http://gw")
        opened.append(http)
        return http

    try:
        yield build
    finally:
        for http in opened:
            await http.aclose()


def assert_envelope(response: httpx.Response, status: int, type_: str, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


async def test_no_admin_key_configured_is_403(client: Client) -> None:
    http = await client(admin_key="")
    for method, url in (("GET", "/admin/adapters"), ("POST", "/admin/adapters"), ("DELETE", "/admin/adapters/a")):
        response = await http.request(method, url, headers=AUTH)
        assert_envelope(response, 403, "permission_error", "admin_disabled")


async def test_missing_or_wrong_key_is_401(client: Client) -> None:
    http = await client()
    assert_envelope(await http.get("/admin/adapters"), 401, "authentication_error")
    response = await http.get("/admin/adapters", headers={"Authorization": "Bearer nope"})
    assert_envelope(response, 401, "authentication_error")


async def test_bad_bodies_are_400(client: Client) -> None:
    http = await client()
    error = assert_envelope(await http.post("/admin/adapters", headers=AUTH, json={"path": "a"}), 400,
                            "invalid_request_error")  # fmt: skip
    assert error["param"] == "name" and "required" in error["message"]
    # A missing 'path' is a 400 too (its param reads null: errors._param_from_loc drops every "path" part).
    assert_envelope(await http.post("/admin/adapters", headers=AUTH, json={"name": "a"}), 400, "invalid_request_error")
    error = assert_envelope(
        await http.post("/admin/adapters", headers=AUTH, json={"name": "a", "path": "a", "extra": 1}), 400,
        "invalid_request_error",
    )  # fmt: skip
    assert error["param"] == "extra"
    response = await http.post("/admin/adapters", headers={**AUTH, "Content-Type": "application/json"}, content=b"{")
    assert_envelope(response, 400, "invalid_request_error")
    error = assert_envelope(
        await http.post("/admin/adapters", headers=AUTH, json={"name": "../x", "path": "x"}), 400,
        "invalid_request_error",
    )  # fmt: skip
    assert error["param"] == "name"


async def test_validation_errors_keep_their_status(client: Client, root: Path, factory: AdapterFactory) -> None:  # noqa: F811
    http = await client(max_adapter_bytes=1000)
    error = assert_envelope(
        await http.post("/admin/adapters", headers=AUTH, json={"name": "a", "path": "../etc"}), 400,
        "invalid_request_error",
    )  # fmt: skip
    assert error["param"] == "path"
    response = await http.post("/admin/adapters", headers=AUTH, json={"name": "a", "path": "missing"})
    assert_envelope(response, 404, "invalid_request_error", "adapter_not_found")
    factory.copy("good", root / "big")
    response = await http.post("/admin/adapters", headers=AUTH, json={"name": "big", "path": "big"})
    assert_envelope(response, 413, "invalid_request_error", "payload_too_large")


async def test_load_list_pin_unload(client: Client, root: Path, factory: AdapterFactory, engine: Engine) -> None:  # noqa: F811
    factory.copy("good", root / "a")
    http = await client()
    assert (await http.get("/admin/adapters", headers=AUTH)).json() == {"object": "list", "data": []}

    response = await http.post("/admin/adapters", headers=AUTH, json={"name": "a", "path": "a", "pin": True})
    assert response.status_code == 200, response.text
    info = response.json()
    assert (info["name"], info["state"], info["pinned"], info["version"]) == ("a", "ready", True, 1)
    assert "a" in engine.fake.loaded

    listed = (await http.get("/admin/adapters", headers=AUTH)).json()["data"]
    assert [(x["name"], x["state"], x["source"], x["path"]) for x in listed] == [("a", "ready", "api", "a")]
    assert {"reason", "loaded_at", "last_used", "load_seconds"} <= set(listed[0])

    assert (await http.post("/admin/adapters/a/unpin", headers=AUTH)).json()["pinned"] is False
    assert (await http.post("/admin/adapters/a/pin", headers=AUTH)).json()["pinned"] is True
    assert_envelope(await http.post("/admin/adapters/zz/pin", headers=AUTH), 404, "invalid_request_error",
                    "adapter_not_found")  # fmt: skip

    response = await http.delete("/admin/adapters/a", headers=AUTH)
    assert response.status_code == 200 and response.json()["removed"] is True
    assert "a" not in engine.fake.loaded
    assert_envelope(await http.delete("/admin/adapters/a", headers=AUTH), 404, "invalid_request_error")


async def test_lora_disabled_is_400(client: Client) -> None:
    http = await client(lora=False)
    error = assert_envelope(await http.get("/admin/adapters", headers=AUTH), 400, "invalid_request_error")
    assert "GOVERNOR_LORA=false" in error["message"]


@pytest.mark.parametrize("path", ["/admin/adapters/a/pin", "/admin/adapters/a/unpin"])
async def test_unknown_adapter_pin_is_404(client: Client, path: str) -> None:
    http = await client()
    assert_envelope(await http.post(path, headers=AUTH), 404, "invalid_request_error", "adapter_not_found")
