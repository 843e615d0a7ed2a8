"""Public orders API (every route needs a token)."""

from __future__ import annotations

from typing import Annotated

from emporium_common import CurrentPrincipal, ErrorResponse, SessionDep
from emporium_common.domain import MAX_INT
from emporium_common.responses import model_response
from fastapi import APIRouter, Header, Path, Query, Request, Response, status

from . import service
from .models import OrderCreate, OrderPublic, OrderStatus, StatusUpdate

router = APIRouter(
    prefix="/orders",
    tags=["orders"],
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
)
OrderId = Annotated[int, Path(ge=1, le=MAX_INT)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes retries safe: the same key (per user) and body return the first order",
    ),
]


def _notify_relay(request: Request) -> None:
    relay = getattr(request.app.state, "relay", None)
    if relay is not None:
        relay.notify()


@router.post(
    "",
    response_model=OrderPublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        400: {"model": ErrorResponse, "description": "Insufficient stock or product not available"},
        409: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
        504: {"model": ErrorResponse},
    },
)
async def create_order(
    body: OrderCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    order, replayed = await service.place_order(
        session, request.app.state.products, principal, body, idempotency_key
    )
    if replayed:
        return model_response(order, 201, {"Idempotent-Replayed": "true"})
    _notify_relay(request)
    return model_response(order, 201)


@router.get("", response_model=list[OrderPublic])
async def list_orders(
    principal: CurrentPrincipal,
    session: SessionDep,
    skip: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
) -> list[OrderPublic]:
    """The caller's orders, newest first (a plain JSON array, as in the older API)."""
    return [OrderPublic.model_validate(o) for o in await service.list_orders(session, principal, skip, limit)]


@router.get("/{order_id}", response_model=OrderPublic)
async def get_order(order_id: OrderId, principal: CurrentPrincipal, session: SessionDep) -> OrderPublic:
    return OrderPublic.model_validate(await service.get_order_for(session, principal, order_id))


@router.patch(
    "/{order_id}/status",
    response_model=OrderPublic,
    responses={403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def update_status(
    order_id: OrderId, body: StatusUpdate, principal: CurrentPrincipal, session: SessionDep, request: Request
) -> OrderPublic:
    """Admins move orders along the state machine; customers may only cancel their own pending orders."""
    order = await service.change_status(session, request.app.state.products, principal, order_id, body.status)
    _notify_relay(request)
    return OrderPublic.model_validate(order)


@router.post(
    "/{order_id}/cancel",
    response_model=OrderPublic,
    responses={403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def cancel_order(
    order_id: OrderId, principal: CurrentPrincipal, session: SessionDep, request: Request
) -> OrderPublic:
    """Cancel an order and release its stock: customers their own pending orders, admins pending or
    confirmed ones. The same move as ``PATCH /orders/{id}/status {"status": "cancelled"}``, on a path of its
    own so that the ingress can keep every other status change for admins (it cannot read bodies)."""
    order = await service.change_status(
        session, request.app.state.products, principal, order_id, OrderStatus.cancelled
    )
    _notify_relay(request)
    return OrderPublic.model_validate(order)
