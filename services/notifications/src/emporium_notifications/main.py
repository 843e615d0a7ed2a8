"""The notifications service app: API + websocket, with the event consumer, the mailer and the websocket
fan-out listener running in its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from emporium_common import TokenVerifier, create_app
from emporium_common.events import EventConsumer
from fastapi import FastAPI

from .config import NotificationsSettings
from .consumer import make_handler
from .mailer import Mailer
from .realtime import Hub, Listener
from .routes import router, ws_router


def build_app(
    settings: NotificationsSettings | None = None, *, token_verifier: TokenVerifier | None = None
) -> FastAPI:
    settings = settings or NotificationsSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks: list[asyncio.Task] = []
        stoppers = []
        if settings.background_workers:
            mailer: Mailer = app.state.mailer
            listener = Listener(settings.database_url, app.state.hub)
            app.state.listener = listener
            tasks += [asyncio.create_task(mailer.run()), asyncio.create_task(listener.run())]
            stoppers += [mailer.stop, listener.stop]
            if settings.amqp_url:
                consumer = EventConsumer(
                    settings.amqp_url,
                    settings.events_queue,
                    make_handler(app.state.engine, mailer.kick),
                    max_attempts=settings.event_max_attempts,
                    backoff_base=settings.event_retry_base_seconds,
                    retry_exchange=settings.events_retry_exchange,
                )
                app.state.consumer = consumer
                tasks.append(asyncio.create_task(consumer.run()))
                stoppers.append(consumer.stop)
        try:
            yield
        finally:
            for stop in stoppers:
                stop()
            if tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    app = create_app(
        settings,
        [router, ws_router],
        title="Emporium notifications",
        token_verifier=token_verifier,
        lifespan=lifespan,
    )
    app.state.hub = Hub()
    app.state.mailer = Mailer(app.state.engine, settings)
    app.state.consumer = None
    app.state.listener = None
    return app
