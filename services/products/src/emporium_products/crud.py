"""Catalogue queries and the stock logic (reservations: conditional decrements under row locks)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from emporium_common import AppError
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import Product, ReservationLine, SortBy, StockReservation

SORTS = {
    SortBy.price: (col(Product.price).asc(), col(Product.id).asc()),
    SortBy.price_desc: (col(Product.price).desc(), col(Product.id).desc()),
    SortBy.name: (col(Product.name).asc(), col(Product.id).asc()),
    SortBy.name_desc: (col(Product.name).desc(), col(Product.id).desc()),
    SortBy.created_at: (col(Product.created_at).asc(), col(Product.id).asc()),
    SortBy.created_at_desc: (col(Product.created_at).desc(), col(Product.id).desc()),
}


def escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def list_products(
    session: AsyncSession,
    *,
    limit: int,
    offset: int,
    category: str | None,
    is_active: bool | None,
    name: str | None,
    sort_by: SortBy,
) -> tuple[list[Product], int]:
    conditions: list[Any] = []
    if category is not None:
        conditions.append(col(Product.category) == category)
    if is_active is not None:
        conditions.append(col(Product.is_active) == is_active)
    if name:
        conditions.append(col(Product.name).ilike(f"%{escape_like(name)}%", escape="\\"))
    total = (await session.exec(select(sa.func.count()).select_from(Product).where(*conditions))).one()
    rows = await session.exec(
        select(Product).where(*conditions).order_by(*SORTS[sort_by]).limit(limit).offset(offset)
    )
    return list(rows.all()), int(total)


async def get_product(session: AsyncSession, product_id: int) -> Product:
    product = await session.get(Product, product_id)
    if product is None:
        raise AppError(404, "Product not found")
    return product


async def save_product(session: AsyncSession, product: Product) -> Product:
    """Commit (409 on a duplicate SKU) and reload."""
    session.add(product)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        if "uq_products_sku" in str(exc.orig):
            raise AppError(409, "SKU already exists") from None
        raise AppError(409, "Product violates a constraint") from None
    await session.refresh(product)
    return product


async def sku_taken(session: AsyncSession, sku: str, exclude_id: int | None = None) -> bool:
    query = select(Product.id).where(col(Product.sku) == sku)
    if exclude_id is not None:
        query = query.where(col(Product.id) != exclude_id)
    return (await session.exec(query)).first() is not None


def merge_lines(lines: list[ReservationLine]) -> dict[int, int]:
    merged: dict[int, int] = defaultdict(int)
    for line in lines:
        merged[line.product_id] += line.quantity
    return dict(merged)


async def reserve_stock(
    session: AsyncSession, reservation_id: str, lines: list[ReservationLine]
) -> tuple[StockReservation, bool]:
    """Reserve every line or nothing. Returns (reservation, created); idempotent per reservation id.

    The reservation row is inserted first: a concurrent call with the same id waits on its unique key and
    then finds it. Product rows are locked in id order (no deadlocks between overlapping orders) and every
    decrement is conditional, so stock never goes below zero.
    """
    merged = merge_lines(lines)
    inserted = (
        await session.exec(
            insert(StockReservation)
            .values(id=reservation_id, status="reserved", lines=[])
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(StockReservation.__table__.c.id)  # type: ignore[attr-defined]
        )
    ).first()
    reactivate = False
    if inserted is None:
        existing = (
            await session.exec(
                select(StockReservation).where(col(StockReservation.id) == reservation_id).with_for_update()
            )
        ).first()
        if existing is None:  # pragma: no cover - reservation rows are never deleted
            raise AppError(409, "Reservation conflict, retry")
        stored = {int(line["product_id"]): int(line["quantity"]) for line in existing.lines}
        if merged != stored:
            await session.rollback()
            raise AppError(409, "Reservation id already used for different lines")
        if existing.status == "reserved":
            return existing, False  # the session's end releases the row lock
        # Released (its order was never stored, or a reaper gave the stock back): reserve it again.
        reactivate = True

    ids = sorted(merged)
    products = {
        p.id: p
        for p in (
            await session.exec(
                select(Product).where(col(Product.id).in_(ids)).order_by(col(Product.id)).with_for_update()
            )
        ).all()
    }
    reserved: list[dict[str, Any]] = []
    for product_id in ids:
        quantity = merged[product_id]
        product = products.get(product_id)
        if product is None:
            await session.rollback()
            raise AppError(404, f"Product {product_id} not found")
        if not product.is_active:
            await session.rollback()
            raise AppError(409, f"Product {product_id} is not available", "product_inactive")
        if product.stock_quantity < quantity:
            available = product.stock_quantity
            await session.rollback()
            raise AppError(
                409,
                f"Insufficient stock for product {product_id}. Available: {available}, requested: {quantity}",
                "insufficient_stock",
            )
        reserved.append(
            {
                "product_id": product_id,
                "quantity": quantity,
                "product_name": product.name,
                "price": str(product.price),
            }
        )
    for line in reserved:
        result = await session.exec(
            sa.update(Product)
            .where(col(Product.id) == line["product_id"], col(Product.stock_quantity) >= line["quantity"])
            .values(stock_quantity=col(Product.stock_quantity) - line["quantity"], updated_at=sa.func.now())
        )
        if result.rowcount != 1:  # pragma: no cover - impossible under the row lock; defence in depth
            await session.rollback()
            raise AppError(409, f"Insufficient stock for product {line['product_id']}", "insufficient_stock")
    await session.exec(
        sa.update(StockReservation)
        .where(col(StockReservation.id) == reservation_id)
        .values(lines=reserved, status="reserved", reserved_at=sa.func.now(), released_at=None)
    )
    await session.commit()
    # What was just committed; no reload round trip (the response needs only these fields).
    return StockReservation(id=reservation_id, status="reserved", lines=reserved), not reactivate


async def release_stock(session: AsyncSession, reservation_id: str) -> StockReservation:
    """Give a reservation's stock back (idempotent: releasing twice restocks once)."""
    reservation = (
        await session.exec(
            select(StockReservation).where(col(StockReservation.id) == reservation_id).with_for_update()
        )
    ).first()
    if reservation is None:
        raise AppError(404, "Reservation not found")
    if reservation.status == "released":
        return reservation
    for line in sorted(reservation.lines, key=lambda line: int(line["product_id"])):
        await session.exec(
            sa.update(Product)
            .where(col(Product.id) == int(line["product_id"]))
            .values(
                stock_quantity=col(Product.stock_quantity) + int(line["quantity"]), updated_at=sa.func.now()
            )
        )
    reservation.status = "released"
    reservation.released_at = sa.func.now()  # type: ignore[assignment]
    session.add(reservation)
    await session.commit()
    await session.refresh(reservation)
    return reservation


def reservation_public(reservation: StockReservation) -> dict[str, Any]:
    return {
        "reservation_id": reservation.id,
        "status": reservation.status,
        "lines": [{**line, "price": Decimal(str(line["price"]))} for line in reservation.lines],
    }


async def stale_reservations(
    session: AsyncSession, older_than_seconds: int, after: datetime | None, limit: int
) -> list[StockReservation]:
    """Reservations still holding stock after ``older_than_seconds``, reserved after ``after`` (a cursor),
    oldest first: the orders reaper releases those that never became an order."""
    conditions = [
        col(StockReservation.status) == "reserved",
        col(StockReservation.reserved_at)
        < sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, older_than_seconds),
    ]
    if after is not None:
        conditions.append(col(StockReservation.reserved_at) > after)
    query = (
        select(StockReservation).where(*conditions).order_by(col(StockReservation.reserved_at)).limit(limit)
    )
    return list((await session.exec(query)).all())
