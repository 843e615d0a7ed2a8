"""Tables (SQLModel) and API schemas of the products service."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

import sqlalchemy as sa
from emporium_common.domain import MAX_INT, MAX_LINE_QUANTITY, MAX_ORDER_LINES, check_merged_quantities
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel


def _no_nul(value: str) -> str:
    # Postgres text cannot hold NUL: refuse it as a validation error instead of failing in the driver.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=3, max_length=200), AfterValidator(_no_nul)
]
Description = Annotated[str, StringConstraints(max_length=1000), AfterValidator(_no_nul)]
Category = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), AfterValidator(_no_nul)
]
# Upper-cased and stripped *before* the length check (the older API checked length first).
Sku = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True,
        to_upper=True,
        min_length=3,
        max_length=50,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
    ),
]
Price = Annotated[Decimal, Field(gt=0, max_digits=10, decimal_places=2, allow_inf_nan=False)]
Stock = Annotated[int, Field(ge=0, le=MAX_INT)]


class Product(SQLModel, table=True):
    __tablename__ = "products"

    id: int | None = SQLField(default=None, primary_key=True)
    name: str = SQLField(sa_column=sa.Column(sa.String(200), nullable=False))
    description: str | None = SQLField(default=None, sa_column=sa.Column(sa.Text))
    price: Decimal = SQLField(sa_column=sa.Column(sa.Numeric(10, 2), nullable=False))
    stock_quantity: int = SQLField(sa_column=sa.Column(sa.Integer, nullable=False))
    sku: str = SQLField(sa_column=sa.Column(sa.String(50), nullable=False, unique=True))
    category: str | None = SQLField(default=None, sa_column=sa.Column(sa.String(100), index=True))
    is_active: bool = SQLField(
        default=True, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.true())
    )
    # Bumped by every write (reservations and releases too): the ETag that If-Match checks.
    version: int = SQLField(default=1, sa_column=sa.Column(sa.Integer, nullable=False, server_default="1"))
    created_at: datetime | None = SQLField(
        default=None,
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    updated_at: datetime | None = SQLField(
        default=None,
        sa_column=sa.Column(
            sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now(), onupdate=sa.func.now()
        ),
    )


class StockReservation(SQLModel, table=True):
    """One reservation per order (its key is the order's reservation id): makes reserve/release idempotent."""

    __tablename__ = "stock_reservations"

    id: str = SQLField(sa_column=sa.Column(sa.String(100), primary_key=True))
    status: str = SQLField(sa_column=sa.Column(sa.String(20), nullable=False))
    lines: list[dict[str, Any]] = SQLField(sa_column=sa.Column(JSONB, nullable=False))
    created_at: datetime | None = SQLField(
        default=None,
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    reserved_at: datetime | None = SQLField(
        default=None,
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    released_at: datetime | None = SQLField(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))


# ---- API schemas -------------------------------------------------------------------------------------


class ProductCreate(BaseModel):
    """Full product (POST, and PUT = full replace: a missing ``is_active`` keeps the current value)."""

    model_config = ConfigDict(extra="ignore")

    name: Name
    description: Description | None = None
    price: Price
    stock_quantity: Stock
    sku: Sku
    category: Category | None = None
    is_active: bool | None = None


class ProductUpdate(BaseModel):
    """PATCH: only the fields sent are applied; ``null`` is refused for required columns."""

    model_config = ConfigDict(extra="ignore")

    name: Name | None = None
    description: Description | None = None
    price: Price | None = None
    stock_quantity: Stock | None = None
    sku: Sku | None = None
    category: Category | None = None
    is_active: bool | None = None

    @field_validator("name", "price", "stock_quantity", "sku", "is_active", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("may be omitted but not null")
        return value


class StockUpdate(BaseModel):
    """Exactly one of: ``delta`` (added atomically, never undoes a reservation; 409 if stock would go below
    zero) or ``stock_quantity`` (absolute; needs ``If-Match`` with the product's ETag, 412 when stale)."""

    model_config = ConfigDict(extra="ignore")

    stock_quantity: Stock | None = None
    delta: int | None = Field(default=None, ge=-MAX_INT, le=MAX_INT)

    @model_validator(mode="after")
    def _exactly_one(self) -> StockUpdate:
        if (self.stock_quantity is None) == (self.delta is None):
            raise ValueError("send exactly one of stock_quantity (absolute) or delta")
        return self


class ProductPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    description: str | None
    price: Decimal = Field(description='Decimal as a JSON string, e.g. "29.99"')
    stock_quantity: int
    sku: str
    category: str | None
    is_active: bool
    created_at: datetime
    updated_at: datetime


class ProductList(BaseModel):
    items: list[ProductPublic]
    total: int
    limit: int
    offset: int


class SortBy(StrEnum):
    price = "price"
    price_desc = "-price"
    name = "name"
    name_desc = "-name"
    created_at = "created_at"
    created_at_desc = "-created_at"


# ---- internal stock API --------------------------------------------------------------------------------


class ReservationLine(BaseModel):
    product_id: int = Field(ge=1, le=MAX_INT)
    quantity: int = Field(gt=0, le=MAX_LINE_QUANTITY)


class ReservationRequest(BaseModel):
    """The same bounds as an order (emporium_common.domain): whatever orders accepts, products accepts."""

    reservation_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")
    lines: list[ReservationLine] = Field(min_length=1, max_length=MAX_ORDER_LINES)

    @field_validator("lines")
    @classmethod
    def _merged_bounds(cls, lines: list[ReservationLine]) -> list[ReservationLine]:
        check_merged_quantities(lines)
        return lines


class ReservedLine(BaseModel):
    product_id: int
    quantity: int
    product_name: str
    price: Decimal


class ReservationPublic(BaseModel):
    reservation_id: str
    status: str
    lines: list[ReservedLine]


class ReservationSummary(BaseModel):
    reservation_id: str
    status: str
    reserved_at: datetime
