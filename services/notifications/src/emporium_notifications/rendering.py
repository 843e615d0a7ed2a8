"""Email content for each event type (Jinja2 with autoescaping: product names are user input)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from emporium_common.events import (
    ORDER_CREATED,
    ORDER_STATUS_UPDATED,
    USER_REGISTERED,
    Envelope,
    PermanentEventError,
)
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, Field, ValidationError

env = Environment(
    loader=PackageLoader("emporium_notifications", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)


class _Item(BaseModel):
    product_id: int | None = None
    product_name: str = ""
    quantity: int = 0
    price: str = "0"
    subtotal: str | None = None


class OrderCreatedData(BaseModel):
    order_id: int
    user_id: str | int
    user_email: str = ""
    total_amount: str = "0"
    items: list[_Item] = Field(default_factory=list)


class OrderStatusData(BaseModel):
    order_id: int
    user_id: str | int
    user_email: str = ""
    old_status: str
    new_status: str


class UserRegisteredData(BaseModel):
    user_id: str | int
    email: str
    username: str | None = None


@dataclass
class Rendered:
    type: str
    recipient: str
    subject: str
    html: str
    text: str
    user_id: str | None
    order_id: int | None
    message: str  # the short line pushed on the websocket


def _money(value: str) -> str:
    try:
        return f"{Decimal(value):.2f}"
    except (InvalidOperation, ValueError):
        return value


def render(envelope: Envelope) -> Rendered | None:
    """The notification for an event, or None for event types that need none."""
    try:
        if envelope.type == ORDER_CREATED:
            data = OrderCreatedData.model_validate(envelope.data)
            items = [
                {**item.model_dump(), "price": _money(item.price), "subtotal": _money(item.subtotal or "0")}
                for item in data.items
            ]
            context: dict[str, Any] = {
                "user_email": data.user_email,
                "order_id": data.order_id,
                "items": items,
                "total_amount": _money(data.total_amount),
            }
            subject = f"Order #{data.order_id} Confirmed"
            lines = [f"{i['product_name']} x {i['quantity']} @ {i['price']}" for i in items]
            text = "\n".join([subject, "", *lines, "", f"Total: {context['total_amount']}"])
            return Rendered(
                "order_confirmation",
                data.user_email,
                subject,
                env.get_template("order_confirmation.html").render(**context),
                text,
                str(data.user_id),
                data.order_id,
                f"Order #{data.order_id} confirmed",
            )
        if envelope.type == ORDER_STATUS_UPDATED:
            data_s = OrderStatusData.model_validate(envelope.data)
            subject = f"Order #{data_s.order_id} Status: {data_s.new_status.capitalize()}"
            return Rendered(
                "order_status_update",
                data_s.user_email,
                subject,
                env.get_template("order_status_update.html").render(**data_s.model_dump()),
                f"{subject}\n\nYour order moved from {data_s.old_status} to {data_s.new_status}.",
                str(data_s.user_id),
                data_s.order_id,
                f"Order #{data_s.order_id}: {data_s.old_status} → {data_s.new_status}",
            )
        if envelope.type == USER_REGISTERED:
            data_u = UserRegisteredData.model_validate(envelope.data)
            subject = "Welcome to Emporium"
            return Rendered(
                "welcome",
                data_u.email,
                subject,
                env.get_template("welcome.html").render(**data_u.model_dump()),
                f"{subject}\n\nYour account {data_u.email} is ready.",
                str(data_u.user_id),
                None,
                "Welcome to Emporium",
            )
    except ValidationError as exc:
        raise PermanentEventError(f"{envelope.type} data is invalid: {exc.error_count()} error(s)") from exc
    return None
