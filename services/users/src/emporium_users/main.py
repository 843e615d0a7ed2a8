"""The users service app: ``uvicorn emporium_users.main:app`` (or ``python -m emporium_users serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from emporium_common import create_app
from emporium_common.auth import StaticKeySet, TokenVerifier
from emporium_common.outbox import OutboxRelay
from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from . import crud, security
from .config import UsersSettings
from .keys import KeyRing, generate_local_keys
from .oidc import ProviderClient
from .routes import oidc, users, wellknown

log = logging.getLogger("emporium.users")


def load_keys(settings: UsersSettings) -> KeyRing:
    if not (settings.jwt_keys_dir / "current.pem").exists() and not settings.is_production:
        generate_local_keys(settings.jwt_keys_dir)  # local runs: made once, kept in the directory
    return KeyRing(settings.jwt_keys_dir)


ADMIN_RETRY_SECONDS = 5.0

# Anonymous routes take small bodies (an email, a username, a password of at most 72 bytes, a token): 16 KiB
# is ample, and a 200 MB body is refused with 413 before it is read. Other routes: MAX_BODY_BYTES (64 KiB).
BODY_LIMITS = {
    "POST /users/register": 16 * 1024,
    "POST /users/login": 16 * 1024,
    "POST /users/refresh": 16 * 1024,
    "POST /users/logout": 16 * 1024,
}


async def bootstrap_admin(app: FastAPI) -> None:
    settings: UsersSettings = app.state.settings
    if not (settings.admin_email and settings.admin_password):
        return
    async with app.state.sessionmaker() as session:
        try:
            await crud.ensure_admin(
                session=session,
                email=settings.admin_email.strip().lower(),
                username=settings.admin_username,
                password=settings.admin_password,
            )
        except crud.DuplicateUser:  # another replica won the race, or the username is taken
            log.warning("admin bootstrap: account not created (email or username already taken)")


async def _bootstrap_admin_until_done(app: FastAPI) -> None:
    # The database may come up after us: keep trying in the background instead of crash-looping the pod
    # (readiness reports the database meanwhile).
    while True:
        try:
            await bootstrap_admin(app)
            return
        except (OSError, SQLAlchemyError) as exc:
            log.warning("admin bootstrap failed, retrying in %.0f s: %r", ADMIN_RETRY_SECONDS, exc)
            await asyncio.sleep(ADMIN_RETRY_SECONDS)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(_bootstrap_admin_until_done(app))
    # The outbox relay publishes user.registered (committed with the user) to the broker, with confirms.
    relay = (
        OutboxRelay(app.state.engine, app.state.settings.amqp_url) if app.state.settings.amqp_url else None
    )
    relay_task = asyncio.create_task(relay.run(), name="outbox-relay") if relay else None
    try:
        yield
    finally:
        if relay is not None and relay_task is not None:
            relay.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(relay_task, 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def build_app(settings: UsersSettings | None = None, keys: KeyRing | None = None) -> FastAPI:
    settings = settings or UsersSettings()
    keys = keys or load_keys(settings)
    security.hashing.configure(settings.password_hash_workers, settings.password_hash_max_waiting)
    # The users service verifies its own tokens against its own key set: no HTTP round trip.
    verifier = TokenVerifier(
        StaticKeySet(keys.jwks), issuer=settings.jwt_issuer, audience=settings.jwt_audience
    )
    app = create_app(
        settings,
        [users.router, oidc.router, wellknown.router],
        title="Emporium users",
        token_verifier=verifier,
        lifespan=lifespan,
        body_limits=BODY_LIMITS,
    )
    app.state.keys = keys
    # One client per configured provider: each caches its discovery document and key set.
    app.state.oidc_clients = {p.name: ProviderClient(p) for p in settings.oidc_providers}
    return app


def __getattr__(name: str) -> FastAPI:
    # `emporium_users.main:app` for uvicorn, built on first access (importing the module has no side effects).
    if name == "app":
        return build_app()
    raise AttributeError(name)
