"""The orders service app: API + the outbox relay (in the lifespan, one per replica)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from emporium_common import TokenVerifier, create_app
from emporium_common.outbox import OutboxRelay
from fastapi import FastAPI

from .config import OrdersSettings
from .products_client import ProductsClient
from .reaper import ReservationReaper
from .routes import router


def build_app(
    settings: OrdersSettings | None = None,
    *,
    token_verifier: TokenVerifier | None = None,
    products_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    settings = settings or OrdersSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        relay_task = None
        if settings.amqp_url and settings.outbox_relay:
            relay = OutboxRelay(
                app.state.engine, settings.amqp_url, poll_interval=settings.outbox_poll_seconds
            )
            app.state.relay = relay
            relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
        reaper_task = None
        if settings.reservation_reaper_seconds:
            reaper = ReservationReaper(
                app.state.engine,
                app.state.products,
                grace_seconds=settings.reservation_grace_seconds,
                interval_seconds=settings.reservation_reaper_seconds,
            )
            reaper_task = asyncio.create_task(reaper.run(), name="reservation-reaper")
        try:
            yield
        finally:
            if reaper_task is not None:
                reaper.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reaper_task, 10)
            if relay_task is not None:
                app.state.relay.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(relay_task, 10)
            await app.state.products.aclose()

    app = create_app(
        settings, [router], title="Emporium orders", token_verifier=token_verifier, lifespan=lifespan
    )
    app.state.relay = None
    app.state.products = ProductsClient(
        settings.products_url,
        settings.internal_token,
        timeout=settings.products_timeout_seconds,
        transport=products_transport,
    )
    return app
