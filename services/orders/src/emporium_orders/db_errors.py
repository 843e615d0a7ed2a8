"""A database that cannot be reached is a 503 (retryable), not a 500."""

from __future__ import annotations

import logging

from emporium_common.errors import error_response
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError

log = logging.getLogger("emporium.db")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %r", exc)
    return error_response(503, "Database unavailable", "service_unavailable", {"Retry-After": "1"})


def install_db_error_handlers(app: FastAPI) -> None:
    for exc_type in (OperationalError, InterfaceError, ConnectionError, TimeoutError):
        app.add_exception_handler(exc_type, _unavailable)
