"""Governor's typed errors (``governor.errors``) as HTTP responses: the OpenAI envelope on every route.

The domain errors know nothing of the web framework; this module maps them, FastAPI's validation errors,
Starlette's HTTP exceptions, a client gone mid-body and anything unexpected to a response.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from governor.errors import GovernorError, InvalidRequest, error_body, from_pydantic, from_status

log = logging.getLogger("governor.errors")


def error_response(exc: GovernorError, *, hide_paths: bool = False) -> Response:
    return Response(
        orjson.dumps(error_body(exc, hide_paths=hide_paths)),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers(),
    )


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """A FastAPI-validated body's first error (see `from_pydantic`)."""
    return from_pydantic(list(exc.errors()), fastapi=True)


def _hides_paths(request: Request) -> bool:
    """Server paths reach only the admin API's callers (see governor.redaction)."""
    path = request.url.path
    return not (path == "/admin" or path.startswith("/admin/"))


def install_handlers(app: FastAPI) -> None:
    """Every error on every route leaves as an OpenAI envelope."""

    @app.exception_handler(GovernorError)
    async def _governor(request: Request, exc: GovernorError) -> Response:
        return error_response(exc, hide_paths=_hides_paths(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc), hide_paths=_hides_paths(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(from_status(exc.status_code, str(exc.detail)), hide_paths=_hides_paths(request))

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> Response:
        # The client hung up while sending its body: nobody reads this answer, and it is no server fault.
        return error_response(InvalidRequest("Client disconnected before the request body was complete."))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(GovernorError("Internal error; see the server log.", code="internal_error"))
