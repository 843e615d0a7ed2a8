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

import logging
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from emporium_common.pg_listen import PgListener

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
    """LISTEN on ``CHANNEL`` (own connection, reconnects with backoff: :class:`PgListener`) for one
    :class:`CatalogCache`: every notification drops the pages; the cache serves only while listening and
    starts afresh on every (re)connect."""

    def __init__(self, database_url: str, cache: CatalogCache) -> None:
        self.cache = cache
        self._listener = PgListener(
            database_url,
            CHANNEL,
            cache.invalidate,
            on_connect=self._connected,
            on_disconnect=self._lost,
            application_name=APPLICATION_NAME,
            log_message="catalogue cache listener failed (cache off until it reconnects)",
            logger=log,
        )

    def stop(self) -> None:
        self._listener.stop()

    def _connected(self) -> None:
        self.cache.invalidate()  # whatever changed while nobody listened
        self.cache.listening = True

    def _lost(self) -> None:
        self.cache.listening = False
        self.cache.invalidate()

    async def run(self) -> None:
        await self._listener.run()
