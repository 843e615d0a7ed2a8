"""The order state machine: pending -> confirmed -> shipped -> delivered; cancel from pending or confirmed."""

from __future__ import annotations

from .models import OrderStatus

TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.pending: frozenset({OrderStatus.confirmed, OrderStatus.cancelled}),
    OrderStatus.confirmed: frozenset({OrderStatus.shipped, OrderStatus.cancelled}),
    OrderStatus.shipped: frozenset({OrderStatus.delivered}),
    OrderStatus.delivered: frozenset(),
    OrderStatus.cancelled: frozenset(),
}


def can_transition(current: OrderStatus, new: OrderStatus) -> bool:
    return new in TRANSITIONS[current]


def customer_may(current: OrderStatus, new: OrderStatus) -> bool:
    """Customers may only cancel their own pending orders; admins drive every other move."""
    return current is OrderStatus.pending and new is OrderStatus.cancelled
