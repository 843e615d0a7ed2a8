"""Websocket fan-out: each user receives only their own events, on whichever replica they are connected.

The consumer (any replica) commits a notification and, in the same transaction, ``pg_notify``s a small
payload; every replica LISTENs and pushes it to its local sockets of that user. Nothing is sent when the
transaction rolls back, and no broker permissions are needed for the fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from typing import Any

import asyncpg
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


def asyncpg_dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


class Listener:
    """LISTEN on the fan-out channel (own connection, reconnects) and push to the hub."""

    def __init__(self, database_url: str, hub: Hub) -> None:
        self.dsn, self.hub = asyncpg_dsn(database_url), hub
        self._stop = asyncio.Event()
        self.listening = asyncio.Event()
        self._pushes: set[asyncio.Task] = set()

    def stop(self) -> None:
        self._stop.set()

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
        delay = 0.5
        while not self._stop.is_set():
            connection = None
            try:
                connection = await asyncpg.connect(self.dsn, timeout=10)
                await connection.add_listener(CHANNEL, self._on_notify)
                self.listening.set()
                delay = 0.5
                while not self._stop.is_set() and not connection.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), timeout=5)
                    if not self._stop.is_set():
                        await connection.execute("SELECT 1")  # notices a dead connection
            except Exception as exc:
                log.warning("websocket fan-out listener failed: %r", exc)
            finally:
                self.listening.clear()
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close(timeout=2)
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                delay = min(delay * 2, 10)
