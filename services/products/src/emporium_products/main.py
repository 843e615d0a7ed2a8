"""The products service app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from emporium_common import TokenVerifier, create_app
from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from .catalog_cache import CacheListener, CatalogCache
from .config import ProductsSettings
from .routes import internal_router, router


def build_app(
    settings: ProductsSettings | None = None, *, token_verifier: TokenVerifier | None = None
) -> FastAPI:
    settings = settings or ProductsSettings()
    cache = CatalogCache(settings.catalog_cache_pages)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if not cache.max_pages:
            yield
            return
        listener = CacheListener(settings.database_url, cache)
        task = asyncio.create_task(listener.run())
        try:
            yield
        finally:
            listener.stop()
            await task

    app = create_app(
        settings,
        [router, internal_router],
        title="Emporium products",
        token_verifier=token_verifier,
        lifespan=lifespan,
    )

    # This process's own writes drop the cached pages as soon as they commit (read your writes), without
    # waiting for their notification to come back.
    class InvalidatingSession(Session):
        pass

    event.listen(InvalidatingSession, "after_commit", lambda _session: cache.invalidate())
    app.state.catalog_cache = cache
    app.state.sessionmaker = async_sessionmaker(
        app.state.engine, class_=AsyncSession, sync_session_class=InvalidatingSession, expire_on_commit=False
    )
    return app
