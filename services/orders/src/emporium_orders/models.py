"""Tables (SQLModel) and API schemas of the orders service.

No ``from __future__ import annotations`` here: SQLModel relationships need real annotations.
"""

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Optional

import sqlalchemy as sa
from emporium_common.domain import (
    MAX_INT,
    MAX_LINE_QUANTITY,
    MAX_ORDER_LINES,
    check_merged_quantities,
    timestamp_column,
)
from emporium_common.outbox import OutboxEvent  # noqa: F401 - the outbox table belongs to this schema too
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import Field as SQLField
from sqlmodel import Relationship, SQLModel


class OrderStatus(StrEnum):
    pending = "pending"
    confirmed = "confirmed"
    shipped = "shipped"
    delivered = "delivered"
    cancelled = "cancelled"


_ts = timestamp_column


class Order(SQLModel, table=True):
    __tablename__ = "orders"

    id: int | None = SQLField(default=None, primary_key=True)
    user_id: str = SQLField(sa_column=sa.Column(sa.String(64), nullable=False))
    user_email: str | None = SQLField(default=None, sa_column=sa.Column(sa.String(255)))
    status: str = SQLField(sa_column=sa.Column(sa.String(20), nullable=False))
    total_amount: Decimal = SQLField(sa_column=sa.Column(sa.Numeric(16, 2), nullable=False))
    reservation_id: str = SQLField(sa_column=sa.Column(sa.String(100), nullable=False))
    idempotency_key: str | None = SQLField(default=None, sa_column=sa.Column(sa.String(255)))
    request_hash: str | None = SQLField(default=None, sa_column=sa.Column(sa.String(64)))
    created_at: datetime | None = SQLField(default=None, sa_column=_ts())
    updated_at: datetime | None = SQLField(default=None, sa_column=_ts(onupdate=True))
    # Set once products confirmed the release of a cancelled order's stock (the reaper retries until then).
    stock_released_at: datetime | None = SQLField(default=None, sa_column=_ts(nullable=True))
    items: list["OrderItem"] = Relationship(
        back_populates="order", sa_relationship_kwargs={"lazy": "selectin", "order_by": "OrderItem.id"}
    )


class OrderItem(SQLModel, table=True):
    __tablename__ = "order_items"

    id: int | None = SQLField(default=None, primary_key=True)
    order_id: int = SQLField(
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("orders.id", ondelete="CASCADE"), nullable=False)
    )
    product_id: int = SQLField(sa_column=sa.Column(sa.Integer, nullable=False))
    product_name: str = SQLField(sa_column=sa.Column(sa.String(200), nullable=False))
    product_price: Decimal = SQLField(sa_column=sa.Column(sa.Numeric(10, 2), nullable=False))
    quantity: int = SQLField(sa_column=sa.Column(sa.Integer, nullable=False))
    subtotal: Decimal = SQLField(sa_column=sa.Column(sa.Numeric(16, 2), nullable=False))
    created_at: datetime | None = SQLField(default=None, sa_column=_ts())
    order: Optional["Order"] = Relationship(back_populates="items")


class OrderStatusChange(SQLModel, table=True):
    __tablename__ = "order_status_history"

    id: int | None = SQLField(default=None, primary_key=True)
    order_id: int = SQLField(
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("orders.id", ondelete="CASCADE"), nullable=False)
    )
    from_status: str | None = SQLField(default=None, sa_column=sa.Column(sa.String(20)))
    to_status: str = SQLField(sa_column=sa.Column(sa.String(20), nullable=False))
    changed_by: str = SQLField(sa_column=sa.Column(sa.String(64), nullable=False))
    changed_at: datetime | None = SQLField(default=None, sa_column=_ts())


# ---- API schemas -------------------------------------------------------------------------------------


class ReaperCursor(SQLModel, table=True):
    """Where the reservation reaper got to, in products' ``(reserved_at, reservation id)`` order: a restart
    resumes here instead of skipping older orphans."""

    __tablename__ = "reaper_cursors"

    name: str = SQLField(sa_column=sa.Column(sa.String(50), primary_key=True))
    reserved_at: datetime = SQLField(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    reservation_id: str = SQLField(sa_column=sa.Column(sa.String(100), nullable=False))
    updated_at: datetime | None = SQLField(default=None, sa_column=_ts(onupdate=True))


class OrderLineIn(BaseModel):
    product_id: int = Field(ge=1, le=MAX_INT)
    quantity: int = Field(gt=0, le=MAX_LINE_QUANTITY)


class OrderCreate(BaseModel):
    items: list[OrderLineIn] = Field(
        min_length=1,
        max_length=MAX_ORDER_LINES,
        description=f"Lines of one product add up; at most {MAX_LINE_QUANTITY} of a product per order",
    )

    @field_validator("items")
    @classmethod
    def _merged_quantities(cls, items: list[OrderLineIn]) -> list[OrderLineIn]:
        check_merged_quantities(items)
        return items


class StatusUpdate(BaseModel):
    status: OrderStatus


class OrderItemPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    order_id: int
    product_id: int
    product_name: str
    product_price: Decimal
    quantity: int
    subtotal: Decimal
    created_at: datetime


class OrderPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    user_id: str
    status: OrderStatus
    total_amount: Decimal
    created_at: datetime
    updated_at: datetime
    items: list[OrderItemPublic]
