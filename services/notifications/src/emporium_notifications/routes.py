"""Notifications API (the caller's own; admins see all) and the websocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Annotated, Literal

from emporium_common import CurrentPrincipal, ErrorResponse, SessionDep, require_role
from emporium_common.auth import LEEWAY_SECONDS, InvalidToken, KeysUnavailable
from emporium_common.domain import MAX_INT
from fastapi import APIRouter, Depends, Path, Query, Request, WebSocket, WebSocketDisconnect

from . import crud
from .models import Notification, NotificationDetail, NotificationList

router = APIRouter(
    prefix="/notifications",
    tags=["notifications"],
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
)
NotificationId = Annotated[int, Path(ge=1, le=MAX_INT)]


@router.get("", response_model=NotificationList, responses={403: {"model": ErrorResponse}})
async def list_notifications(
    principal: CurrentPrincipal,
    session: SessionDep,
    recipient: Annotated[
        str | None, Query(max_length=255, pattern=r"^[^\x00]*$", description="Admins only")
    ] = None,
    status: Literal["pending", "sent", "failed"] | None = None,
    order_id: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
) -> NotificationList:
    rows, total = await crud.list_notifications(
        session,
        principal,
        recipient=recipient,
        status=status,
        order_id=order_id,
        page=page,
        page_size=page_size,
    )
    return NotificationList.model_validate({"notifications": rows, "total": total})


@router.get("/{notification_id}", response_model=NotificationDetail)
async def get_notification(
    notification_id: NotificationId, principal: CurrentPrincipal, session: SessionDep
) -> Notification:
    return await crud.get_notification(session, principal, notification_id)


@router.post(
    "/retry/{notification_id}",
    response_model=NotificationDetail,
    dependencies=[Depends(require_role("admin"))],
    responses={400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)
async def retry_notification(
    notification_id: NotificationId, principal: CurrentPrincipal, session: SessionDep, request: Request
) -> Notification:
    """Send a failed notification again (its stored body, to its stored recipient); returns the new status."""
    notification = await crud.mark_for_retry(session, principal, notification_id)
    await request.app.state.mailer.deliver_due(only_id=notification_id)
    await session.refresh(notification)
    return notification


ws_router = APIRouter()


def _token_from(websocket: WebSocket) -> str | None:
    # ?access_token= is where the Istio ingress also looks for a browser's token (its default).
    token = websocket.query_params.get("access_token") or websocket.query_params.get("token")
    if token:
        return token
    authorization = websocket.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    # Browsers cannot set headers: "Sec-WebSocket-Protocol: bearer, <token>" works too.
    protocols = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",")]
    if len(protocols) == 2 and protocols[0].lower() == "bearer":
        return protocols[1]
    return None


# Close codes (4000-4999 are the application's): the client should get a new token and reconnect, or
# close another of its sockets first.
CLOSE_TOKEN_EXPIRED = 4401
CLOSE_TOO_MANY_SOCKETS = 4429
CLOSE_TRY_AGAIN_LATER = 1013  # the issuer's keys cannot be had right now


async def notifications_socket(websocket: WebSocket) -> None:
    """Authenticated with the same JWT (``?token=``, ``Authorization: Bearer`` or the ``bearer``
    subprotocol); delivers only the caller's own events. Messages as in the older API.

    The socket is closed with 4401 "Token expired" when the token expires (the same leeway as HTTP), and
    a user may hold at most ``WEBSOCKET_MAX_PER_USER`` sockets per replica (4429 beyond)."""
    token = _token_from(websocket)
    verifier = websocket.app.state.token_verifier
    try:
        if not token or verifier is None:
            raise InvalidToken("no token")
        principal = await verifier.verify(token)
    except InvalidToken:
        await websocket.close(code=1008, reason="Not authenticated")
        return
    except KeysUnavailable:
        await websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason="Cannot verify tokens right now")
        return
    subprotocol = (
        "bearer" if "bearer" in websocket.headers.get("sec-websocket-protocol", "").lower() else None
    )
    await websocket.accept(subprotocol=subprotocol)
    hub = websocket.app.state.hub
    if hub.count(principal.sub) >= websocket.app.state.settings.websocket_max_per_user:
        await websocket.close(code=CLOSE_TOO_MANY_SOCKETS, reason="Too many sockets for this user")
        return
    hub.add(principal.sub, websocket)
    expires_in = float(principal.claims["exp"]) + LEEWAY_SECONDS - time.time()
    try:
        async with asyncio.timeout(max(expires_in, 0)):
            await websocket.send_json({"type": "connected", "message": "Connected to notifications"})
            while True:
                raw = await websocket.receive_text()
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    if json.loads(raw).get("type") == "ping":
                        await websocket.send_json({"type": "pong"})
    except TimeoutError:
        hub.remove(principal.sub, websocket)  # no more pushes to it
        with contextlib.suppress(Exception):
            await websocket.close(code=CLOSE_TOKEN_EXPIRED, reason="Token expired")
    except (WebSocketDisconnect, RuntimeError, asyncio.CancelledError):
        pass
    finally:
        hub.remove(principal.sub, websocket)


ws_router.add_api_websocket_route("/ws/notifications", notifications_socket)
ws_router.add_api_websocket_route("/ws", notifications_socket)
