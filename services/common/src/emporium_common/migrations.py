"""Alembic conventions shared by every service.

- Schema changes only through migrations in ``services/<svc>/migrations/versions``.
- Migrations run as their own step (``python -m emporium_<svc> migrate``; a Job/init container in
  Kubernetes), never at app startup, and never ``create_all``.
- A service's ``migrations/env.py`` is two lines::

      from emporium_common.migrations import run_alembic_env
      from emporium_users.models import SQLModel  # importing the models registers the tables

      run_alembic_env(SQLModel.metadata)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from .config import Settings, to_asyncpg_url


def alembic_config(alembic_ini: str | Path, database_url: str | None = None) -> Config:
    """The Config of a service's alembic.ini; ``database_url`` (else ``DATABASE_URL``) is the target."""
    alembic_ini = Path(alembic_ini)
    cfg = Config(str(alembic_ini))
    cfg.set_main_option("script_location", str(alembic_ini.parent / "migrations"))
    # Passed as an attribute, not a main option: ConfigParser would choke on '%' in passwords.
    cfg.attributes["database_url"] = to_asyncpg_url(database_url or Settings().database_url)
    return cfg


def upgrade_head(alembic_ini: str | Path, database_url: str | None = None) -> None:
    """``alembic upgrade head``. Blocking, with its own event loop: from async code use upgrade_head_async."""
    command.upgrade(alembic_config(alembic_ini, database_url), "head")


async def upgrade_head_async(alembic_ini: str | Path, database_url: str | None = None) -> None:
    await asyncio.to_thread(upgrade_head, alembic_ini, database_url)


def _do_run(connection: Connection, target_metadata: MetaData) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online(url: str, target_metadata: MetaData) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool, hide_parameters=True)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_do_run, target_metadata)
    finally:
        await engine.dispose()


def run_alembic_env(target_metadata: MetaData) -> None:
    """The body of every service's ``migrations/env.py``."""
    config = context.config
    url = config.attributes.get("database_url") or to_asyncpg_url(Settings().database_url)
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    else:
        asyncio.run(_run_online(url, target_metadata))
