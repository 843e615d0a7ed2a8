"""Catalogue queries and the stock logic (reservations: conditional decrements under row locks)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from emporium_common import AppError
from emporium_common.domain import MAX_INT, merge_lines
from sqlalchemy.dialects.postgresql import JSONB, insert
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


PUBLIC_COLUMNS = [
    col(getattr(Product, name))
    for name in (
        "id",
        "name",
        "description",
        "price",
        "stock_quantity",
        "sku",
        "category",
        "is_active",
        "created_at",
        "updated_at",
    )
]


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
) -> tuple[list[dict[str, Any]], int]:
    """One page and the total in one round trip (``count(*) OVER ()``); plain rows, no ORM objects."""
    conditions: list[Any] = []
    if category is not None:
        conditions.append(col(Product.category) == category)
    if is_active is not None:
        conditions.append(col(Product.is_active) == is_active)
    if name:
        conditions.append(col(Product.name).ilike(f"%{escape_like(name)}%", escape="\\"))
    table = Product.__table__  # type: ignore[attr-defined]
    query = (
        sa.select(*PUBLIC_COLUMNS, sa.func.count().over().label("total"))
        .select_from(table)
        .where(*conditions)
        .order_by(*SORTS[sort_by])
        .limit(limit)
        .offset(offset)
    )
    rows = [dict(row) for row in (await session.execute(query)).mappings()]
    if rows:
        return rows, int(rows[0]["total"])
    if offset == 0:
        return [], 0
    # Past the last page: the window function had no row to ride on.
    total = (await session.execute(sa.select(sa.func.count()).select_from(table).where(*conditions))).scalar()
    return [], int(total or 0)


async def get_product(session: AsyncSession, product_id: int, *, lock: bool = False) -> Product:
    product = await session.get(Product, product_id, with_for_update=lock or None)
    if product is None:
        raise AppError(404, "Product not found")
    return product


def etag(product: Product) -> str:
    return f'"{product.id}-{product.version}"'


def check_if_match(product: Product, if_match: str | None, *, required: bool) -> None:
    """Optimistic concurrency for writes: ``If-Match`` must name the current ETag (412 otherwise).

    ``required``: the write sets an absolute stock level, which silently undoes any reservation committed
    since the client read the product; without ``If-Match`` it is refused with 428.
    """
    if if_match is None:
        if required:
            raise AppError(
                428,
                "Setting an absolute stock level needs If-Match with the product's ETag "
                '(or send {"delta": n} to PATCH /products/{id}/stock)',
                "precondition_required",
            )
        return
    tags = {tag.strip().removeprefix("W/") for tag in if_match.split(",")}
    if "*" not in tags and etag(product) not in tags:
        raise AppError(
            412,
            "The product changed since it was read (stale If-Match): read it again and retry",
            "precondition_failed",
            headers={"ETag": etag(product)},
        )


async def add_stock(session: AsyncSession, product_id: int, delta: int) -> Product:
    """Add ``delta`` (may be negative) atomically: concurrent reservations are never undone."""
    stock = col(Product.stock_quantity)
    row = (
        await session.exec(
            sa.update(Product)
            .where(col(Product.id) == product_id, stock + delta >= 0, stock + delta <= MAX_INT)
            .values(stock_quantity=stock + delta, version=col(Product.version) + 1, updated_at=sa.func.now())
            .returning(col(Product.id))
        )
    ).first()
    if row is None:
        await session.rollback()
        product = await get_product(session, product_id)
        raise AppError(
            409,
            f"Stock of product {product_id} cannot change by {delta}: {product.stock_quantity} in stock",
            "insufficient_stock",
        )
    await session.commit()
    return await get_product(session, product_id)


async def save_product(session: AsyncSession, product: Product) -> Product:
    """Commit (409 on a duplicate SKU) with a new version, and reload."""
    product.version = (product.version or 0) + 1
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


async def reserve_stock(
    session: AsyncSession, reservation_id: str, lines: list[ReservationLine]
) -> tuple[StockReservation, bool]:
    """Reserve every line or nothing. Returns (reservation, created); idempotent per reservation id.

    The reservation row is inserted first: a concurrent call with the same id waits on its unique key and
    then finds it. Product rows are locked in id order (no deadlocks between overlapping orders) and every
    decrement is conditional, so stock never goes below zero.
    """
    merged = merge_lines(lines)
    inserted = (await session.execute(_INSERT_RESERVATION, {"b_id": reservation_id, "b_lines": []})).first()
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
            raise AppError(409, "Reservation id already used for different lines", "reservation_conflict")
        if existing.status == "reserved":
            return existing, False  # the session's end releases the row lock
        # Released (its order was never stored, or a reaper gave the stock back): reserve it again.
        reactivate = True

    ids = sorted(merged)
    products = {row.id: row for row in await session.execute(_LOCK_PRODUCTS, {"b_ids": ids})}
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
    # One statement for every line and the reservation's own row (the rows are locked above, so the checks
    # cannot fail here).
    changed = (
        await session.execute(
            _RESERVE_LINES,
            {
                "b_ids": ids,
                "b_deltas": [-merged[pid] for pid in ids],
                "b_id": reservation_id,
                "b_lines": reserved,
            },
        )
    ).scalar_one()
    if changed != len(ids):  # pragma: no cover - impossible under the row lock; defence in depth
        await session.rollback()
        raise AppError(409, "Insufficient stock, retry", "insufficient_stock")
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
    if reservation.lines:
        deltas = {int(line["product_id"]): int(line["quantity"]) for line in reservation.lines}
        await session.execute(_CHANGE_STOCK, {"b_ids": list(deltas), "b_deltas": list(deltas.values())})
    reservation.status = "released"
    reservation.released_at = sa.func.now()  # type: ignore[assignment]
    session.add(reservation)
    await session.commit()
    await session.refresh(reservation)
    return reservation


# The reservation path's statements, built once with bound parameters: building them on every call (ORM
# attribute operators, coercions, a CASE per order) cost as much CPU as running them.
_PRODUCTS = Product.__table__  # type: ignore[attr-defined]
_RESERVATIONS = StockReservation.__table__  # type: ignore[attr-defined]
_INSERT_RESERVATION = (
    insert(_RESERVATIONS)
    .values(id=sa.bindparam("b_id"), status="reserved", lines=sa.bindparam("b_lines", type_=JSONB))
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(_RESERVATIONS.c.id)
)
_LOCK_PRODUCTS = (
    sa.select(
        _PRODUCTS.c.id, _PRODUCTS.c.name, _PRODUCTS.c.price, _PRODUCTS.c.stock_quantity, _PRODUCTS.c.is_active
    )
    .where(_PRODUCTS.c.id.in_(sa.bindparam("b_ids", expanding=True)))
    .order_by(_PRODUCTS.c.id)
    .with_for_update()
)
# Adds b_deltas[i] to the stock of product b_ids[i] (never below zero) and bumps its version.
_CHANGE_STOCK = sa.text(
    "UPDATE products SET stock_quantity = products.stock_quantity + d.delta,"
    " version = products.version + 1, updated_at = now()"
    " FROM unnest(CAST(:b_ids AS integer[]), CAST(:b_deltas AS integer[])) AS d(id, delta)"
    " WHERE products.id = d.id AND products.stock_quantity + d.delta >= 0"
)
# _CHANGE_STOCK's decrements and the reservation marked reserved with its lines, in one round trip; returns
# how many products changed.
_RESERVE_LINES = sa.text(
    "WITH stock AS ("
    " UPDATE products SET stock_quantity = products.stock_quantity + d.delta,"
    " version = products.version + 1, updated_at = now()"
    " FROM unnest(CAST(:b_ids AS integer[]), CAST(:b_deltas AS integer[])) AS d(id, delta)"
    " WHERE products.id = d.id AND products.stock_quantity + d.delta >= 0"
    " RETURNING products.id)"
    " UPDATE stock_reservations SET lines = :b_lines, status = 'reserved', reserved_at = now(),"
    " released_at = NULL WHERE id = :b_id"
    " RETURNING (SELECT count(*) FROM stock)"
).bindparams(sa.bindparam("b_lines", type_=JSONB))


def reservation_public(reservation: StockReservation) -> dict[str, Any]:
    return {
        "reservation_id": reservation.id,
        "status": reservation.status,
        "lines": [{**line, "price": Decimal(str(line["price"]))} for line in reservation.lines],
    }


async def stale_reservations(
    session: AsyncSession,
    older_than_seconds: int,
    after: datetime | None,
    limit: int,
    after_id: str | None = None,
) -> list[StockReservation]:
    """Reservations still holding stock after ``older_than_seconds``, after the cursor ``(after, after_id)``
    in ``(reserved_at, id)`` order: the orders reaper releases those that never became an order."""
    conditions = [
        col(StockReservation.status) == "reserved",
        col(StockReservation.reserved_at)
        < sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, older_than_seconds),
    ]
    if after is not None and after_id is not None:
        conditions.append(
            sa.tuple_(col(StockReservation.reserved_at), col(StockReservation.id))
            > sa.tuple_(after, after_id)
        )
    elif after is not None:
        conditions.append(col(StockReservation.reserved_at) > after)
    query = (
        select(StockReservation)
        .where(*conditions)
        .order_by(col(StockReservation.reserved_at), col(StockReservation.id))
        .limit(limit)
    )
    return list((await session.exec(query)).all())
