"""Async database access: one engine per app (the per-request session is ``deps.SessionDep``).

Tables come from Alembic migrations only (see ``emporium_common.migrations``); nothing here creates them.
"""

from __future__ import annotations

from sqlalchemy import event, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from .config import Settings, to_asyncpg_url

# Predictable constraint names, so Alembic migrations can refer to (and drop) them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION


def create_engine(settings_or_url: Settings | str, *, pool_size: int = 10) -> AsyncEngine:
    """An asyncpg engine.

    - ``pool_size`` connections are kept open and none beyond (no overflow): as many as before at most,
      but a burst above the pool's size waits for a connection instead of opening and closing one per
      request (with 5 kept and 5 of overflow, 8 concurrent requests reconnected all the time).
    - A pooled connection whose socket Postgres closed (a restart, a fast shutdown, an idle timeout) is
      noticed at checkout without a round trip and replaced (``pool_pre_ping`` did the same with three:
      BEGIN, an empty query and ROLLBACK before every request's own statements).
    - hide_parameters: SQL errors (and their logs) show the statement but never the bound values
      (emails, password hashes, tokens).
    """
    if isinstance(settings_or_url, Settings):
        url, pool_size = settings_or_url.database_url, settings_or_url.database_pool_size
    else:
        url = to_asyncpg_url(settings_or_url)
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, hide_parameters=True)
    event.listen(engine.sync_engine, "checkout", _replace_closed)
    return engine


def _replace_closed(dbapi_connection, _record, _proxy) -> None:
    """Pool checkout: a connection the server closed raises DisconnectionError, which makes the pool
    discard it and hand out a new one (the pessimistic disconnect handling of SQLAlchemy's docs)."""
    connection = getattr(dbapi_connection, "_connection", None)  # the asyncpg connection
    if connection is not None and connection.is_closed():
        raise DisconnectionError("connection closed by the server")


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: objects stay readable after commit (responses are built after it).
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def check_database(engine: AsyncEngine) -> None:
    """Readiness check: raises when the database does not answer."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
