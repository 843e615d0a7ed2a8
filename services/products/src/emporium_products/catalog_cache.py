"""A read cache of catalogue pages (the JSON bodies of ``GET /products``), dropped on every product change.

Every statement that writes ``products`` NOTIFYs ``emporium_products_changed`` at its commit (a trigger,
migration 0003), whoever wrote it: this replica, another one, a reservation, psql. Each process LISTENs on
its own connection and drops every page when a notification arrives; its own writes also drop the pages
at once after their commit, so a client reads its writes from the replica it wrote to. A replica sees
another's write within the notification's delivery (milliseconds), as a read replica would.

The cache serves only while the LISTEN connection is up: a change could go unnoticed otherwise. When it
(re)connects, every page is dropped first. A page read from the database is kept only if nothing changed
while it was being read (the generation it started with is still current), so a slow read never stores a
page older than a change it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import asyncpg

log = logging.getLogger("emporium.products.cache")
CHANNEL = "emporium_products_changed"
APPLICATION_NAME = "emporium-products-cache"  # pg_stat_activity names the LISTEN connection


class CatalogCache:
    def __init__(self, max_pages: int = 1024) -> None:
        self.max_pages = max_pages
        self.generation = 0
        self.listening = False
        self._pages: OrderedDict[Hashable, tuple[int, bytes]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> bytes | None:
        if not self.listening:
            return None
        entry = self._pages.get(key)
        if entry is None or entry[0] != self.generation:
            self.misses += 1
            return None
        self._pages.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, generation: int, body: bytes) -> None:
        """Keep ``body``, read from the database when the generation was ``generation``, if still current."""
        if not self.listening or generation != self.generation:
            return
        self._pages[key] = (generation, body)
        self._pages.move_to_end(key)
        while len(self._pages) > self.max_pages:
            self._pages.popitem(last=False)

    def invalidate(self, *_: Any) -> None:
        """Drop every page (also an asyncpg notification callback: connection, pid, channel, payload)."""
        self.generation += 1
        self._pages.clear()


class CacheListener:
    """LISTEN on ``CHANNEL`` (own connection, reconnects with backoff) for one :class:`CatalogCache`."""

    def __init__(self, database_url: str, cache: CatalogCache) -> None:
        self.dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.cache = cache
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _lost(self, *_: Any) -> None:
        self.cache.listening = False
        self.cache.invalidate()

    async def run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            connection = None
            try:
                connection = await asyncpg.connect(
                    self.dsn, timeout=10, server_settings={"application_name": APPLICATION_NAME}
                )
                connection.add_termination_listener(self._lost)
                await connection.add_listener(CHANNEL, self.cache.invalidate)
                self.cache.invalidate()  # whatever changed while nobody listened
                self.cache.listening = True
                delay = 0.5
                while not self._stop.is_set() and not connection.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), timeout=5)
                    if not self._stop.is_set():
                        await connection.execute("SELECT 1")  # notices a connection that died silently
            except Exception as exc:
                log.warning("catalogue cache listener failed (cache off until it reconnects): %r", exc)
            finally:
                self._lost()
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close(timeout=2)
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                delay = min(delay * 2, 10)
