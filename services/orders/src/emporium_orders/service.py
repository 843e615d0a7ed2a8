"""Placing orders (reserve stock, then commit the order and its event together) and moving their status."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from decimal import Decimal

import sqlalchemy as sa
from emporium_common import AppError, Principal
from emporium_common.domain import merge_lines
from emporium_common.events import ORDER_CREATED, ORDER_STATUS_UPDATED, build_envelope
from emporium_common.outbox import add_event, event_row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import Order, OrderCreate, OrderItemPublic, OrderPublic, OrderStatus, OrderStatusChange
from .products_client import ProductsClient
from .state import can_transition, customer_may

log = logging.getLogger("emporium.orders")
RESERVATION_NAMESPACE = uuid.UUID("0d7c5d1e-64b4-4d0a-9a57-5d8f1a2b3c4d")


# An order, its items, its first status-history row and its ``order.created`` outbox event in one statement
# (one round trip, inside the session's transaction); the event's ``order_id`` is the new order's id. One
# row per item comes back, with the order's id and timestamps.
_PLACE_ORDER = sa.text("""
WITH new_order AS (
    INSERT INTO orders (
        user_id, user_email, status, total_amount, reservation_id, idempotency_key, request_hash
    )
    VALUES (
        :user_id, :user_email, 'pending', :total, :reservation_id, :idempotency_key, :request_hash
    )
    RETURNING id, created_at, updated_at
), items AS (
    INSERT INTO order_items (order_id, product_id, product_name, product_price, quantity, subtotal)
    SELECT new_order.id, line.product_id, line.product_name, line.price, line.quantity, line.subtotal
    FROM new_order, unnest(
        CAST(:product_ids AS integer[]), CAST(:product_names AS varchar[]), CAST(:prices AS numeric[]),
        CAST(:quantities AS integer[]), CAST(:subtotals AS numeric[])
    ) AS line (product_id, product_name, price, quantity, subtotal)
    RETURNING id, product_id, created_at
), history AS (
    INSERT INTO order_status_history (order_id, from_status, to_status, changed_by)
    SELECT id, NULL, 'pending', CAST(:user_id AS varchar) FROM new_order
), event AS (
    INSERT INTO outbox (event_id, type, payload, created_at)
    SELECT CAST(:event_id AS uuid), CAST(:event_type AS varchar),
        jsonb_set(CAST(:payload AS jsonb), '{data,order_id}', to_jsonb(id)), CAST(:occurred_at AS timestamptz)
    FROM new_order
)
SELECT new_order.id, new_order.created_at, new_order.updated_at,
    items.id AS item_id, items.product_id, items.created_at AS item_created_at
FROM new_order, items
""")


def request_hash(lines: dict[int, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(lines.items())).encode()).hexdigest()


async def find_by_key(session: AsyncSession, user_id: str, key: str) -> Order | None:
    query = select(Order).where(col(Order.user_id) == user_id, col(Order.idempotency_key) == key)
    return (await session.exec(query)).first()


def _replay(order: Order, digest: str) -> OrderPublic:
    if order.request_hash != digest:
        raise AppError(
            422, "Idempotency-Key was already used with a different request", "idempotency_key_reused"
        )
    return OrderPublic.model_validate(order)


async def place_order(
    session: AsyncSession,
    products: ProductsClient,
    principal: Principal,
    body: OrderCreate,
    idempotency_key: str | None,
) -> tuple[OrderPublic, bool]:
    """Returns (order, replayed). Stock is reserved in one call to products; the order, its items and its
    ``order.created`` event commit in one transaction.

    A reservation is released here only when nothing can still use it: no Idempotency-Key (the reservation
    id is this request's own) and a failure *before* the commit. With a key, a concurrent retry may commit
    an order on the same reservation; when the commit itself fails its outcome is unknown. In both cases the
    reservation is left to the reaper, which releases it after the grace period if no order holds it.
    """
    lines = merge_lines(body.items)
    digest = request_hash(lines)
    if idempotency_key:
        existing = await find_by_key(session, principal.sub, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), True
        # Same key -> same reservation id: concurrent retries reserve once.
        reservation_id = uuid.uuid5(RESERVATION_NAMESPACE, f"{principal.sub}\n{idempotency_key}").hex
    else:
        reservation_id = uuid.uuid4().hex

    reserved = await products.reserve(reservation_id, lines)
    total = sum((line["price"] * int(line["quantity"]) for line in reserved), Decimal(0))
    envelope = build_envelope(
        ORDER_CREATED,
        {
            "order_id": None,  # the new order's id, set by the INSERT (_PLACE_ORDER)
            "user_id": principal.sub,
            "user_email": principal.email or "",
            "status": OrderStatus.pending.value,
            "total_amount": str(total),
            "items": [
                {
                    "product_id": int(line["product_id"]),
                    "product_name": line["product_name"],
                    "quantity": int(line["quantity"]),
                    "price": str(line["price"]),
                    "subtotal": str(line["price"] * int(line["quantity"])),
                }
                for line in reserved
            ],
        },
    )
    event = event_row(envelope)
    items = envelope.data["items"]
    params = {
        "user_id": principal.sub,
        "user_email": principal.email,
        "total": total,
        "reservation_id": reservation_id,
        "idempotency_key": idempotency_key,
        "request_hash": digest,
        "product_ids": [item["product_id"] for item in items],
        "product_names": [item["product_name"] for item in items],
        "prices": [Decimal(item["price"]) for item in items],
        "quantities": [item["quantity"] for item in items],
        "subtotals": [Decimal(item["subtotal"]) for item in items],
        "event_id": event["event_id"],
        "event_type": event["type"],
        "payload": json.dumps(event["payload"]),
        "occurred_at": event["created_at"],
    }
    try:
        rows = (await session.execute(_PLACE_ORDER, params)).all()
    except IntegrityError:
        await session.rollback()
        if idempotency_key:
            # A concurrent retry with the same key won the race: it holds the same reservation.
            existing = await find_by_key(session, principal.sub, idempotency_key)
            if existing is not None:
                return _replay(existing, digest), True
        else:
            await products.release(reservation_id)
        raise AppError(409, "Order could not be stored, please retry") from None
    except Exception:
        await session.rollback()
        if not idempotency_key:
            await products.release(reservation_id)
        raise
    try:
        await session.commit()
    except Exception:
        # The COMMIT may have reached the database: releasing now could free stock a stored order holds.
        log.warning(
            "commit of an order failed with an unknown outcome; reservation %s left to the reaper",
            reservation_id,
        )
        raise
    # No reload: ids and server-side timestamps came back with the INSERTs (RETURNING).
    order_id, created_at, updated_at = rows[0].id, rows[0].created_at, rows[0].updated_at
    stored = {row.product_id: row for row in rows}
    return OrderPublic(
        id=order_id,
        user_id=principal.sub,
        status=OrderStatus.pending,
        total_amount=total,
        created_at=created_at,
        updated_at=updated_at,
        items=[
            OrderItemPublic(
                id=stored[item["product_id"]].item_id,
                order_id=order_id,
                product_id=item["product_id"],
                product_name=item["product_name"],
                product_price=Decimal(item["price"]),
                quantity=item["quantity"],
                subtotal=Decimal(item["subtotal"]),
                created_at=stored[item["product_id"]].item_created_at,
            )
            for item in sorted(items, key=lambda item: stored[item["product_id"]].item_id)
        ],
    ), False


async def get_order_for(
    session: AsyncSession, principal: Principal, order_id: int, *, lock: bool = False
) -> Order:
    query = select(Order).where(col(Order.id) == order_id)
    if lock:
        query = query.with_for_update()
    order = (await session.exec(query)).first()
    if order is None or (order.user_id != principal.sub and not principal.has_role("admin")):
        raise AppError(404, f"Order {order_id} not found")
    return order


async def change_status(
    session: AsyncSession, products: ProductsClient, principal: Principal, order_id: int, new: OrderStatus
) -> Order:
    """Move an order along the state machine. A cancel commits first and then releases the stock (an
    idempotent call): if products cannot be reached, the order stays cancelled with ``stock_released_at``
    unset and the reaper retries the release (never a release whose cancel then failed to commit)."""
    order = await get_order_for(session, principal, order_id, lock=True)
    current = OrderStatus(order.status)
    if not principal.has_role("admin"):
        if new is not OrderStatus.cancelled:
            raise AppError(403, "Customers may only cancel their own orders", "forbidden")
        if not customer_may(current, new):
            raise AppError(409, f"Cannot change order status from {current} to {new}", "illegal_transition")
    if not can_transition(current, new):
        raise AppError(409, f"Cannot change order status from {current} to {new}", "illegal_transition")
    order.status = new
    session.add(order)
    session.add(
        OrderStatusChange(order_id=order.id, from_status=current, to_status=new, changed_by=principal.sub)
    )
    add_event(
        session,
        ORDER_STATUS_UPDATED,
        {
            "order_id": order.id,
            "user_id": order.user_id,
            "user_email": order.user_email or "",
            "old_status": str(current),
            "new_status": str(new),
            "updated_by": principal.sub,
            "total_amount": str(order.total_amount),
        },
    )
    await session.commit()
    if new is OrderStatus.cancelled:
        try:
            await release_cancelled(session, products, order.id, order.reservation_id)  # type: ignore[arg-type]
        except AppError as exc:
            log.warning(
                "stock of cancelled order %s not released yet (%s); the reaper retries", order.id, exc
            )
    await session.refresh(order)
    return order


async def release_cancelled(
    session: AsyncSession, products: ProductsClient, order_id: int, reservation_id: str
) -> None:
    """Release a cancelled order's stock (idempotent in products) and record that it is done."""
    await products.release(reservation_id)
    await session.exec(
        sa.update(Order)
        .where(col(Order.id) == order_id, col(Order.stock_released_at).is_(None))
        .values(stock_released_at=sa.func.now())
    )
    await session.commit()


async def release_pending_cancellations(
    engine: AsyncEngine, products: ProductsClient, limit: int = 100
) -> int:
    """Retry the releases of cancelled orders whose stock products has not confirmed as released."""
    async with AsyncSession(engine) as session:
        pending = (
            await session.exec(
                select(Order.id, Order.reservation_id)
                .where(col(Order.status) == OrderStatus.cancelled, col(Order.stock_released_at).is_(None))
                .order_by(col(Order.id))
                .limit(limit)
            )
        ).all()
        for order_id, reservation_id in pending:
            await release_cancelled(session, products, order_id, reservation_id)  # type: ignore[arg-type]
    return len(pending)


async def list_orders(session: AsyncSession, principal: Principal, skip: int, limit: int) -> list[Order]:
    query = (
        select(Order)
        .where(col(Order.user_id) == principal.sub)
        .order_by(col(Order.created_at).desc(), col(Order.id).desc())
        .offset(skip)
        .limit(limit)
    )
    return list((await session.exec(query)).all())
