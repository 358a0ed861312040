"""API keys: user keys for /v1, a separate admin key for /admin. Keys are never logged."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from starlette.requests import Request

from governor.errors import Forbidden, Unauthorized
from governor.settings import Settings


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key a client presents: `Authorization: Bearer <key>` or `X-API-Key`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return headers.get("x-api-key")


def _matches(key: str, candidates: list[str]) -> bool:
    # Compare against every candidate (no early exit) so timing says nothing about which matched.
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def is_admin(settings: Settings, key: str | None) -> bool:
    return bool(settings.admin_key) and key is not None and _matches(key, [settings.admin_key])


def check_user(settings: Settings, request: Request) -> None:
    """/v1 routes: open when no user keys are configured; the admin key is accepted too."""
    if not settings.api_keys:
        return
    key = presented_key(request.headers)
    if key is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    if not (_matches(key, settings.api_keys) or is_admin(settings, key)):
        raise Unauthorized("Invalid API key.")


def check_admin(settings: Settings, request: Request) -> None:
    """/admin routes: off without an admin key, never open (a proxy in front would make it public)."""
    if not settings.admin_key:
        raise Forbidden("The admin API is off. Set GOVERNOR_ADMIN_KEY to turn it on.", code="admin_disabled")
    key = presented_key(request.headers)
    if key is None:
        raise Unauthorized("Missing admin key: send 'Authorization: Bearer <admin key>'.")
    if is_admin(settings, key):
        return
    if settings.api_keys and _matches(key, settings.api_keys):
        raise Forbidden("This key may not use the admin API.", code="not_admin")
    raise Unauthorized("Invalid admin key.")


def check_metrics(settings: Settings, request: Request) -> None:
    if not settings.metrics_auth:
        return
    key = presented_key(request.headers)
    if key is None:
        raise Unauthorized("Missing API key for /metrics.")
    if not (_matches(key, settings.api_keys) or is_admin(settings, key)):
        raise Unauthorized("Invalid API key.")
