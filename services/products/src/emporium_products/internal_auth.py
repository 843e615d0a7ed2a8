"""Service-to-service authentication for ``/internal/*`` (never routed by the ingress)."""

from __future__ import annotations

import hmac
from typing import Annotated

from emporium_common import AppError
from fastapi import Header, Request

HEADER = "X-Internal-Token"


async def require_internal_token(
    request: Request, x_internal_token: Annotated[str | None, Header(alias=HEADER)] = None
) -> None:
    expected: str | None = request.app.state.settings.internal_token
    if not expected or not x_internal_token or not hmac.compare_digest(expected, x_internal_token):
        raise AppError(403, "Internal endpoint", "forbidden")
