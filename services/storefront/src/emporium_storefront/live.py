"""Live notifications: the page opens a websocket to the storefront (same origin, session cookie), and
the storefront relays the user's notifications from the notifications service, connecting there with the
user's token (``Sec-WebSocket-Protocol: bearer, <token>``). The token never reaches the page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from urllib.parse import urlsplit

import websockets
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from .session import Session

log = logging.getLogger("emporium.storefront.live")
router = APIRouter(include_in_schema=False)

# Close codes the page's script understands (4000-4999 are the application's).
NOT_SIGNED_IN = 4401  # the script stops trying
REFRESH_NEEDED = 4402  # the script asks GET /session (silent refresh), then reconnects
UPSTREAM_GONE = 4503  # the script reconnects after a pause


@router.websocket("/live")
async def live(websocket: WebSocket) -> None:
    session: Session = websocket.scope["session"]
    origin = websocket.headers.get("origin")
    if origin and urlsplit(origin).netloc != websocket.headers.get("host", ""):
        await websocket.close(code=1008, reason="Cross-origin")  # cross-site websocket hijacking
        return
    token = session.get("access_token")
    if not token:
        await websocket.close(code=NOT_SIGNED_IN, reason="Not signed in")
        return
    if session.get("access_exp", 0) - time.time() < 30:
        # The cookie cannot be renewed on a websocket: the page refreshes the session, then comes back.
        await websocket.close(code=REFRESH_NEEDED, reason="Session needs a refresh")
        return
    upstream = websocket.app.state.upstream
    try:
        remote = await websockets.connect(
            upstream.ws_url("/ws/notifications"),
            subprotocols=["bearer", token],  # type: ignore[list-item]
            open_timeout=5,
            ping_interval=20,
        )
    except (OSError, websockets.WebSocketException, TimeoutError) as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        log.info("notifications websocket refused: %r", error)
        await websocket.close(code=REFRESH_NEEDED if status in (401, 403) else UPSTREAM_GONE)
        return
    await websocket.accept()

    async def downstream() -> None:
        async for raw in remote:
            with contextlib.suppress(ValueError):
                message = json.loads(raw)
                if message.get("type") in ("notification", "connected"):
                    await websocket.send_json(message)

    async def upstream_pings() -> None:
        while True:
            text = await websocket.receive_text()
            if text == "ping":
                await websocket.send_json({"type": "pong"})

    tasks = [asyncio.create_task(downstream()), asyncio.create_task(upstream_pings())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            with contextlib.suppress(WebSocketDisconnect, websockets.WebSocketException, RuntimeError):
                task.result()
    finally:
        for task in tasks:
            task.cancel()
        await remote.close()
        with contextlib.suppress(RuntimeError):
            await websocket.close(code=UPSTREAM_GONE)
