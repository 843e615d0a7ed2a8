"""Releases stock reservations that never became an order (the orders process died between reserving and
committing). Reservations are read oldest first with a time cursor, each checked once per process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import Order
from .products_client import ProductsClient

log = logging.getLogger("emporium.orders.reaper")
REAPED = Counter("emporium_orders_reservations_reaped_total", "Orphaned stock reservations released")


class ReservationReaper:
    def __init__(
        self,
        engine: AsyncEngine,
        products: ProductsClient,
        *,
        grace_seconds: int = 300,
        interval_seconds: float = 60,
        page: int = 100,
        start: datetime | None = None,
    ) -> None:
        self.engine, self.products, self.grace, self.interval, self.page = (
            engine,
            products,
            grace_seconds,
            interval_seconds,
            page,
        )
        self.cursor = (start or datetime.now(UTC) - timedelta(hours=1)).isoformat()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run_once(self) -> int:
        released = 0
        while True:
            batch = await self.products.stale_reservations(self.grace, self.cursor, self.page)
            if not batch:
                return released
            ids = [r["reservation_id"] for r in batch]
            async with AsyncSession(self.engine) as session:
                found = set(
                    (
                        await session.exec(
                            select(Order.reservation_id).where(col(Order.reservation_id).in_(ids))
                        )
                    ).all()
                )
            for reservation_id in ids:
                if reservation_id not in found:
                    await self.products.release(reservation_id)
                    REAPED.inc()
                    released += 1
                    log.warning("released orphaned stock reservation %s", reservation_id)
            self.cursor = batch[-1]["reserved_at"]
            if len(batch) < self.page:
                return released

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("reservation reaper failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval)
