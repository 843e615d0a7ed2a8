"""Websocket fan-out: each user receives only their own events, on whichever replica they are connected.

The consumer (any replica) commits a notification and, in the same transaction, ``pg_notify``s a small
payload; every replica LISTENs and pushes it to its local sockets of that user. Nothing is sent when the
transaction rolls back, and no broker permissions are needed for the fan-out.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from typing import Any

from emporium_common.pg_listen import PgListener
from fastapi import WebSocket
from prometheus_client import Counter, Gauge

log = logging.getLogger("emporium.notifications.ws")

CHANNEL = "emporium_notifications"
CONNECTIONS = Gauge("emporium_notifications_websocket_connections", "Open notification websockets")
PUSHED = Counter("emporium_notifications_websocket_messages_total", "Notifications pushed to websockets")


class Hub:
    def __init__(self) -> None:
        self._sockets: dict[str, set[WebSocket]] = defaultdict(set)

    def count(self, user_id: str) -> int:
        return len(self._sockets.get(user_id, ()))

    def add(self, user_id: str, websocket: WebSocket) -> None:
        self._sockets[user_id].add(websocket)
        CONNECTIONS.inc()

    def remove(self, user_id: str, websocket: WebSocket) -> None:
        sockets = self._sockets.get(user_id)
        if sockets and websocket in sockets:
            sockets.discard(websocket)
            CONNECTIONS.dec()
            if not sockets:
                self._sockets.pop(user_id, None)

    async def push(self, user_id: str, message: dict[str, Any]) -> None:
        sockets = list(self._sockets.get(user_id, ()))
        if not sockets:
            return

        async def send(ws: WebSocket) -> None:
            try:
                await asyncio.wait_for(ws.send_json(message), timeout=5)
                PUSHED.inc()
            except Exception:  # a slow or dead socket is dropped, never blocks the others
                self.remove(user_id, ws)

        await asyncio.gather(*(send(ws) for ws in sockets))


class Listener:
    """LISTEN on the fan-out channel (own connection, reconnects: :class:`PgListener`) and push to the hub."""

    def __init__(self, database_url: str, hub: Hub) -> None:
        self.hub = hub
        self.listening = asyncio.Event()
        self._pushes: set[asyncio.Task] = set()
        self._listener = PgListener(
            database_url,
            CHANNEL,
            self._on_notify,
            on_connect=self.listening.set,
            on_disconnect=self.listening.clear,
            log_message="websocket fan-out listener failed",
            logger=log,
        )

    def stop(self) -> None:
        self._listener.stop()

    def _on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
            user_id = str(data.pop("user_id"))
        except (ValueError, KeyError):
            return
        task = asyncio.get_running_loop().create_task(
            self.hub.push(user_id, {"type": "notification", "data": data})
        )
        self._pushes.add(task)  # keep a reference until done (the loop only holds weak ones)
        task.add_done_callback(self._pushes.discard)

    async def run(self) -> None:
        await self._listener.run()
