"""Calls to the other services over the cluster network, with the signed-in user's token.

Every failure becomes an exception the pages turn into a message a person can act on: ``ApiError``
(the service answered 4xx/5xx; its ``detail``) or ``Unavailable`` (it did not answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import httpx
from emporium_common.request_id import get_request_id

from .config import StorefrontSettings

log = logging.getLogger("emporium.storefront.upstream")

SERVICES = ("users", "products", "orders", "notifications")


class ApiError(Exception):
    def __init__(self, service: str, status: int, detail: Any, code: str | None = None) -> None:
        super().__init__(f"{service}: {status} {detail}")
        self.service, self.status, self.detail, self.code = service, status, detail, code

    @property
    def message(self) -> str:
        """The service's detail as one sentence (validation errors: their messages)."""
        if isinstance(self.detail, list):
            return "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'input'}: {e.get('msg', '')}"
                for e in self.detail
                if isinstance(e, dict)
            )
        return str(self.detail)

    def field_errors(self) -> dict[str, str]:
        """Validation errors by field name (the last element of ``loc``)."""
        errors: dict[str, str] = {}
        if isinstance(self.detail, list):
            for e in self.detail:
                if isinstance(e, dict) and e.get("loc"):
                    errors.setdefault(str(e["loc"][-1]), str(e.get("msg", "invalid")))
        return errors


class Unavailable(Exception):
    def __init__(self, service: str) -> None:
        super().__init__(f"{service} did not answer")
        self.service = service


class Upstream:
    def __init__(
        self, settings: StorefrontSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.base = {
            "users": settings.users_url.rstrip("/"),
            "products": settings.products_url.rstrip("/"),
            "orders": settings.orders_url.rstrip("/"),
            "notifications": settings.notifications_url.rstrip("/"),
        }
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.upstream_timeout_seconds, connect=2.0),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
            transport=transport,
        )
        # Refresh tokens are single-use (a reuse revokes the whole family): two requests of one browser
        # refreshing at once must not both spend it. One refresh per token, its result kept briefly.
        self._refresh_locks: dict[str, asyncio.Lock] = {}
        self._refreshed: dict[str, tuple[float, dict]] = {}

    def ws_url(self, path: str) -> str:
        base = self.base["notifications"]
        return ("wss://" + base[8:] if base.startswith("https://") else "ws://" + base[7:]) + path

    async def close(self) -> None:
        await self.client.aclose()

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201, 204),
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        request_id = get_request_id()
        if request_id:
            all_headers["X-Request-ID"] = request_id
        try:
            response = await self.client.request(
                method,
                self.base[service] + path,
                json=json,
                params={k: v for k, v in (params or {}).items() if v not in (None, "")},
                headers=all_headers,
            )
        except httpx.HTTPError as error:
            log.warning("%s %s %s failed: %r", service, method, path, error)
            raise Unavailable(service) from error
        if response.status_code in ok:
            return response
        if response.status_code >= 500 and response.status_code != 503:
            log.warning("%s %s %s: %s", service, method, path, response.status_code)
        try:
            body = response.json()
            detail, code = body.get("detail", response.reason_phrase), body.get("code")
        except (ValueError, AttributeError):
            detail, code = response.reason_phrase, None
        if response.status_code in (502, 503, 504):
            raise Unavailable(service)
        raise ApiError(service, response.status_code, detail, code)

    async def json(self, service: str, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.call(service, method, path, **kwargs)
        return response.json() if response.content else None

    async def refresh(self, refresh_token: str) -> dict:
        key = hashlib.sha256(refresh_token.encode()).hexdigest()
        lock = self._refresh_locks.setdefault(key, asyncio.Lock())
        async with lock:
            now = time.monotonic()
            self._refreshed = {k: v for k, v in self._refreshed.items() if v[0] > now}
            if key in self._refreshed:
                return self._refreshed[key][1]
            tokens = await self.json("users", "POST", "/users/refresh", json={"refresh_token": refresh_token})
            self._refreshed[key] = (now + 60, tokens)
        self._refresh_locks.pop(key, None)
        return tokens
