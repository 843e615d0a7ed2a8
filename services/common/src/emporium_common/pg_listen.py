"""A Postgres LISTEN that stays up: its own asyncpg connection, reconnected with backoff when it is lost.

Why it exists: products (the catalogue cache, dropped on ``emporium_products_changed``) and notifications
(the websocket fan-out of ``emporium_notifications``) both keep a LISTEN connection for the life of the
process, and both must survive a restarted Postgres, a terminated backend or a connection that died
silently. The loop that does it lives here once; what a notification means, and what to do when the
listener (re)connects or loses its connection, stays in each service (the hooks).

A notification sent while no connection listens is lost (Postgres keeps none for later): callers that
cannot miss a change resynchronise in ``on_connect`` (the catalogue cache drops every page), and treat
what they know as unreliable from ``on_disconnect`` until the next ``on_connect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

log = logging.getLogger("emporium.pg_listen")

# asyncpg's listener callback: (connection, backend pid, channel, payload)
NotifyCallback = Callable[[Any, int, str, str], Any]


def asyncpg_dsn(database_url: str) -> str:
    """``DATABASE_URL`` as SQLAlchemy takes it (``postgresql+asyncpg://``) -> what asyncpg connects to."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


class PgListener:
    """LISTEN on ``channel`` until :meth:`stop` (or the task running :meth:`run` is cancelled).

    - ``on_notify(connection, pid, channel, payload)``: asyncpg's listener callback, for each notification.
    - ``on_connect()``: after LISTEN took effect on a new connection (the first one and every reconnect), so
      that nothing notified after it is missed: invalidate or resync here.
    - ``on_disconnect()``: whenever the listener is not listening: the connection was lost (called from
      asyncpg's termination callback as soon as the socket closes, and again when the loop notices), a
      connect failed, or the listener stops. Called more than once per loss: make it idempotent.

    The connection is checked with ``SELECT 1`` every ``check_interval`` seconds (a connection that died
    without closing its socket is noticed then). A failed connect or a lost connection is retried after
    0.5 s, doubling up to ``max_delay``; a connection that came up resets the delay. Each failure is logged
    as a warning (``logger``), ``log_message`` and the error. ``application_name`` names the connection in
    ``pg_stat_activity``.
    """

    def __init__(
        self,
        database_url: str,
        channel: str,
        on_notify: NotifyCallback,
        *,
        on_connect: Callable[[], Any] | None = None,
        on_disconnect: Callable[[], Any] | None = None,
        application_name: str | None = None,
        log_message: str = "LISTEN connection failed",
        logger: logging.Logger = log,
        check_interval: float = 5.0,
        max_delay: float = 10.0,
    ) -> None:
        self.dsn = asyncpg_dsn(database_url)
        self.channel = channel
        self.on_notify = on_notify
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.application_name = application_name
        self.log_message, self.logger = log_message, logger
        self.check_interval = check_interval
        self.max_delay = max_delay
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Make :meth:`run` close its connection and return."""
        self._stop.set()

    def _lost(self, *_: Any) -> None:
        if self.on_disconnect is not None:
            self.on_disconnect()

    async def run(self) -> None:
        delay = 0.5
        server_settings = {"application_name": self.application_name} if self.application_name else None
        while not self._stop.is_set():
            connection = None
            try:
                connection = await asyncpg.connect(self.dsn, timeout=10, server_settings=server_settings)
                connection.add_termination_listener(self._lost)
                await connection.add_listener(self.channel, self.on_notify)
                if self.on_connect is not None:
                    self.on_connect()
                delay = 0.5
                while not self._stop.is_set() and not connection.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), timeout=self.check_interval)
                    if not self._stop.is_set():
                        await connection.execute("SELECT 1")  # notices a connection that died silently
            except Exception as exc:
                self.logger.warning("%s (reconnecting in %.1f s): %r", self.log_message, delay, exc)
            finally:
                self._lost()
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close(timeout=2)
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                delay = min(delay * 2, self.max_delay)
