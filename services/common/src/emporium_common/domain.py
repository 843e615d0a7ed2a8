"""Values and helpers the services' models share: integer bounds, the order-line limits orders and products
agree on, merging order lines, and timestamp columns/values."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Protocol

import sqlalchemy as sa

# Postgres ``integer``: ids, offsets and quantities beyond it are refused with 422, never a driver error.
MAX_INT = 2**31 - 1

# One order: at most MAX_ORDER_LINES lines, and at most MAX_LINE_QUANTITY of one product once its lines are
# merged. Orders refuses more with 422 naming ``items``; products' internal reservation API accepts exactly
# these bounds, so nothing orders accepts can be refused by products (the older API answered 503 then).
MAX_ORDER_LINES = 50
MAX_LINE_QUANTITY = 1000


class Line(Protocol):
    product_id: int
    quantity: int


def merge_lines(lines: Iterable[Line]) -> dict[int, int]:
    """``{product_id: total quantity}`` in product id order (duplicate lines of one product add up)."""
    merged: dict[int, int] = {}
    for line in lines:
        merged[line.product_id] = merged.get(line.product_id, 0) + line.quantity
    return dict(sorted(merged.items()))


def check_merged_quantities(lines: Iterable[Line]) -> None:
    """Raise ``ValueError`` (422 on the lines' field) when a product's merged quantity is over the limit."""
    for product_id, quantity in merge_lines(lines).items():
        if quantity > MAX_LINE_QUANTITY:
            raise ValueError(
                f"product {product_id}: {quantity} in total across lines, "
                f"at most {MAX_LINE_QUANTITY} per product"
            )


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (never naive)."""
    return datetime.now(UTC)


def timestamp_column(*, nullable: bool = False, onupdate: bool = False) -> sa.Column:
    """A ``timestamptz`` column; non-nullable ones default to ``now()`` in the database."""
    if nullable:
        return sa.Column(sa.DateTime(timezone=True))
    return sa.Column(
        sa.DateTime(timezone=True),
        nullable=False,
        server_default=sa.func.now(),
        onupdate=sa.func.now() if onupdate else None,
    )
