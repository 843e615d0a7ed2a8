"""The test helpers themselves: per-test rollback really rolls back."""

import pytest
from emporium_common import testing
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError


async def test_rollback_session_discards_commits(common_engine):
    async with testing.rollback_session(common_engine) as session:
        await session.exec(text("CREATE TABLE scratch (id int primary key)"))
        await session.exec(text("INSERT INTO scratch VALUES (1)"))
        await session.commit()  # only releases a savepoint
        with pytest.raises(IntegrityError):
            await session.exec(text("INSERT INTO scratch VALUES (1)"))  # duplicate
        await session.rollback()  # back to the last savepoint: the first row survives
        assert (await session.exec(text("SELECT count(*) FROM scratch"))).scalar_one() == 1
    async with common_engine.connect() as conn:
        exists = await conn.execute(text("SELECT to_regclass('scratch')"))
        assert exists.scalar_one() is None
