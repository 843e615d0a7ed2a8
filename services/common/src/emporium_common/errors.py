"""One error shape for every service: ``{"detail": ..., "code": ..., "request_id": ...}``.

422 for validation errors (bad JSON included), the HTTPException's own status otherwise, 503 when the
database cannot be reached, and a logged, generic 500 for anything unexpected (never the exception text).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .request_id import get_request_id

log = logging.getLogger("emporium.errors")

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}


class ErrorResponse(BaseModel):
    """The body of every error response (use it in ``responses=`` for OpenAPI docs)."""

    detail: Any
    code: str
    request_id: str | None = None


class AppError(Exception):
    """Raise for an expected failure with a specific machine-readable code."""

    def __init__(
        self, status_code: int, detail: Any, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers
        self.code = code or CODES.get(status_code, "error")


def error_response(
    status_code: int, detail: Any, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    code = code or CODES.get(status_code, "error")
    body = ErrorResponse(detail=detail, code=code, request_id=get_request_id())
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only loc/msg/type: the raw input and ctx may hold secrets (passwords) or non-JSON values.
    return [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")), "type": err.get("type")}
        for err in exc.errors()
    ]


async def _app_error(request: Request, exc: AppError) -> JSONResponse:
    return error_response(exc.status_code, exc.detail, exc.code, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, exc.detail, None, getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, _validation_details(exc))


# SQLSTATE classes that mean "the database cannot serve you right now", not "your statement is wrong":
# 08 connection exception, 57P01-57P05 operator intervention (shutting down, starting up, crashed,
# dropped, idle timeout), 53 insufficient resources (too many connections, out of disk or memory).
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57P", "53")


def _unavailable_cause(exc: BaseException) -> bool:
    import asyncpg  # the only driver we use; imported here so errors.py stays importable without it

    if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError)):
        return True  # refused, reset, timed out, or asyncpg's "connection is closed"
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES)


def is_database_unavailable(exc: BaseException) -> bool:
    """True for errors that mean the database is restarting, unreachable or overloaded (retry later)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError):
            if current.connection_invalidated:
                return True
            if current.orig is not None and _unavailable_cause(current.orig):
                return True
        elif _unavailable_cause(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _log_parameters_hidden(exc: BaseException) -> str:
    # str(DBAPIError) ends with "[SQL: ...] [parameters: ...]": the statement helps, the parameters may be
    # emails or password hashes. The engine hides them already (hide_parameters); this is a second guard.
    if isinstance(exc, DBAPIError):
        return f"{type(exc).__name__}: {exc.orig!r}" if exc.orig is not None else type(exc).__name__
    return repr(exc)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Not the caller's fault and likely temporary: 503 says "retry", a 500 would say "bug".
    log.warning("database unavailable: %s", _log_parameters_hidden(exc))
    return error_response(503, "Database unavailable", "service_unavailable", {"Retry-After": "1"})


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if is_database_unavailable(exc):
        return await _database_unavailable(request, exc)
    return await _unhandled(request, exc)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path, "method": request.method})
    return error_response(500, "Internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Every DBAPIError is looked at: "the database system is starting up" is neither an OperationalError
    # nor an InterfaceError with asyncpg, and must not become a 500.
    app.add_exception_handler(DBAPIError, _database_error)
    for exc_type in (ConnectionError, TimeoutError):
        app.add_exception_handler(exc_type, _database_unavailable)
    app.add_exception_handler(Exception, _unhandled)
