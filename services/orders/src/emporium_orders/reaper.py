"""Releases stock that no order holds any more:

- reservations that never became an order (the orders process died between reserving and committing, a
  commit with an unknown outcome, an Idempotency-Key request that failed): read from products oldest first
  in ``(reserved_at, id)`` order after the grace period, with a cursor kept in the ``reaper_cursors`` table
  so that a restart resumes where the last run stopped (orphans older than any window are still found);
- cancelled orders whose release products has not confirmed (it was down when the cancel committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

import sqlalchemy as sa
from prometheus_client import Counter
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import Order, ReaperCursor
from .products_client import ProductsClient
from .service import release_pending_cancellations

log = logging.getLogger("emporium.orders.reaper")
REAPED = Counter("emporium_orders_reservations_reaped_total", "Orphaned stock reservations released")
CURSOR = "stale-reservations"


class ReservationReaper:
    def __init__(
        self,
        engine: AsyncEngine,
        products: ProductsClient,
        *,
        grace_seconds: int = 300,
        interval_seconds: float = 60,
        page: int = 100,
    ) -> None:
        self.engine, self.products, self.grace, self.interval, self.page = (
            engine,
            products,
            grace_seconds,
            interval_seconds,
            page,
        )
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def cursor(self) -> tuple[str | None, str | None]:
        async with AsyncSession(self.engine) as session:
            row = await session.get(ReaperCursor, CURSOR)
        return (row.reserved_at.isoformat(), row.reservation_id) if row else (None, None)

    async def _save_cursor(self, reserved_at: str, reservation_id: str) -> None:
        table = ReaperCursor.__table__  # type: ignore[attr-defined]
        values = {"reserved_at": datetime.fromisoformat(reserved_at), "reservation_id": reservation_id}
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(table)
                .values(name=CURSOR, **values)
                .on_conflict_do_update(index_elements=["name"], set_={**values, "updated_at": sa.func.now()})
            )

    async def run_once(self) -> int:
        """One pass; returns how many orphaned reservations were released."""
        await release_pending_cancellations(self.engine, self.products)
        released = 0
        after, after_id = await self.cursor()
        while True:
            batch = await self.products.stale_reservations(self.grace, after, self.page, after_id)
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
            after, after_id = batch[-1]["reserved_at"], batch[-1]["reservation_id"]
            await self._save_cursor(after, after_id)  # type: ignore[arg-type]
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
