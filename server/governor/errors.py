"""Typed errors and their OpenAI error envelope, without a web framework (``api/errors.py`` makes them responses)."""

from __future__ import annotations

from typing import Any

from governor.redaction import redact_paths


class GovernorError(Exception):
    """Base of every error a client may see; carries the HTTP status and OpenAI error fields."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(GovernorError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GovernorError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GovernorError):
    status = 403
    type = "permission_error"


class NotFound(GovernorError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class Conflict(GovernorError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(GovernorError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(GovernorError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class EngineUnavailable(GovernorError):
    status = 503
    type = "server_error"
    code = "engine_unavailable"


class AdapterWaitTimeout(EngineUnavailable):
    """Every engine slot for adapters stayed in use while the request waited: retry, never a refusal for room."""

    code = "adapter_wait_timeout"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, param="model")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class DeadlineExceeded(GovernorError):
    status = 504
    type = "server_error"
    code = "deadline_exceeded"


def envelope(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """The OpenAI error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(exc: GovernorError, *, hide_paths: bool = False) -> dict[str, Any]:
    return envelope(redact_paths(exc.message) if hide_paths else exc.message, exc.type, exc.param, exc.code)


def from_pydantic(errors: list[Any], *, fastapi: bool = False) -> InvalidRequest:
    """The first pydantic error as a 400 naming the field (`messages.0.role`); the one helper for
    request bodies, whether Governor or FastAPI (`fastapi`: locations start with body/query/…) validated them."""
    if not errors:
        return InvalidRequest("Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequest("Request body is not valid JSON.", code="invalid_json")
    loc = first.get("loc", ())
    where = ("body", "query", "path", "header", "cookie")
    parts = [str(p) for p in (loc[1:] if fastapi and loc and loc[0] in where else loc)]
    param = ".".join(parts) or None
    prefix = f"'{param}': " if param else ""
    return InvalidRequest(f"{prefix}{first.get('msg', 'invalid value')}", param=param)


class ClientGone(GovernorError):
    """The client disconnected before its answer; nobody reads this error, it is counted as 499."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"


def from_transport(exc: BaseException, *, started: bool) -> GovernorError:
    """A failure talking to an engine as Governor's error: a deadline is 504, anything else 503
    (`started`: whether generation had begun, which only changes the message)."""
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded("Request deadline exceeded; generation was stopped.")
    if started:
        return EngineUnavailable("The engine stopped while generating; the response is incomplete.")
    return EngineUnavailable("The engine is not reachable; retry shortly.")


_STATUS_TYPES: dict[int, type[GovernorError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: InvalidRequest,
    409: Conflict,
    413: PayloadTooLarge,
    429: Overloaded,
    503: EngineUnavailable,
    504: DeadlineExceeded,
}


def from_status(status: int, message: str) -> GovernorError:
    """Best typed error for an HTTP status (used for upstream and framework errors)."""
    cls = _STATUS_TYPES.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else EngineUnavailable
    err = cls(message)
    if status in (405, 422):
        err.status = status if status == 405 else 400
    return err
