"""Async database access: one engine per app (the per-request session is ``deps.SessionDep``).

Tables come from Alembic migrations only (see ``emporium_common.migrations``); nothing here creates them.
"""

from __future__ import annotations

from sqlalchemy import text
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


def create_engine(settings_or_url: Settings | str, *, pool_size: int = 5) -> AsyncEngine:
    """An asyncpg engine.

    - pool_pre_ping: a pooled connection that a restarted Postgres closed is noticed at checkout and
      replaced, so the first read after a restart does not fail on a dead connection.
    - hide_parameters: SQL errors (and their logs) show the statement but never the bound values
      (emails, password hashes, tokens).
    """
    if isinstance(settings_or_url, Settings):
        url, pool_size = settings_or_url.database_url, settings_or_url.database_pool_size
    else:
        url = to_asyncpg_url(settings_or_url)
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        hide_parameters=True,
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: objects stay readable after commit (responses are built after it).
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def check_database(engine: AsyncEngine) -> None:
    """Readiness check: raises when the database does not answer."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
