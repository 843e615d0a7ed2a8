"""The orders service's client for the products service's internal stock API (one call per order)."""

from __future__ import annotations

import contextlib
import logging
from decimal import Decimal
from typing import Any

import httpx
from emporium_common import AppError

log = logging.getLogger("emporium.orders.products")


class ProductsClient:
    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"X-Internal-Token": token or ""},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, json: Any = None) -> httpx.Response:
        try:
            return await self._client.post(path, json=json)
        except httpx.TimeoutException:
            log.warning("products service timed out on %s", path)
            raise AppError(504, "Product service request timed out", "upstream_timeout") from None
        except httpx.HTTPError as exc:
            log.warning("products service unreachable on %s: %r", path, exc)
            raise AppError(503, "Product service unavailable", "service_unavailable") from None

    @staticmethod
    def _detail(response: httpx.Response) -> str:
        try:
            return str(response.json().get("detail"))
        except (ValueError, AttributeError):
            return response.text[:200]

    async def reserve(self, reservation_id: str, lines: dict[int, int]) -> list[dict[str, Any]]:
        """Reserve every line (all or nothing); returns lines with the server's names and prices."""
        body = {
            "reservation_id": reservation_id,
            "lines": [{"product_id": pid, "quantity": qty} for pid, qty in sorted(lines.items())],
        }
        response = await self._post("/internal/stock/reservations", body)
        if response.status_code in (200, 201):
            return [{**line, "price": Decimal(str(line["price"]))} for line in response.json()["lines"]]
        if response.status_code == 404:
            raise AppError(404, self._detail(response))
        if response.status_code == 409:
            code = "insufficient_stock"
            with contextlib.suppress(ValueError, AttributeError):
                code = response.json().get("code") or code
            if code == "reservation_conflict":
                # The reservation id comes from the Idempotency-Key: the key was used for other lines.
                raise AppError(
                    422, "Idempotency-Key was already used with a different request", "idempotency_key_reused"
                )
            # insufficient stock / inactive product: 400 as in the older API
            raise AppError(400, self._detail(response), code)
        log.error(
            "products service answered %s to a reservation: %s", response.status_code, response.text[:300]
        )
        raise AppError(503, "Product service unavailable", "service_unavailable")

    async def release(self, reservation_id: str) -> None:
        response = await self._post(f"/internal/stock/reservations/{reservation_id}/release")
        if response.status_code in (200, 404):  # 404: nothing was ever reserved under that id
            return
        log.error("products service answered %s to a release: %s", response.status_code, response.text[:300])
        raise AppError(503, "Product service unavailable", "service_unavailable")

    async def stale_reservations(
        self, older_than_seconds: int, after: str | None, limit: int, after_id: str | None = None
    ) -> list[dict]:
        params: dict[str, Any] = {"older_than_seconds": older_than_seconds, "limit": limit}
        if after:
            params["after"] = after
        if after_id:
            params["after_id"] = after_id
        try:
            response = await self._client.get("/internal/stock/reservations", params=params)
        except httpx.HTTPError as exc:
            raise AppError(503, "Product service unavailable", "service_unavailable") from exc
        if response.status_code != 200:
            raise AppError(503, "Product service unavailable", "service_unavailable")
        return response.json()
