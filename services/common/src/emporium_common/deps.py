"""FastAPI dependencies on the database: one session per request, from the app's engine.

Apart from ``db`` so that the migrations, which import the models and ``db``, do not load FastAPI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel.ext.asyncio.session import AsyncSession


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """FastAPI dependency: a session from the app's engine (``create_app`` puts it on ``app.state``).

    Tests override this dependency with a session inside a rolled-back transaction.
    """
    async with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
