"""A failed SMTP send is retried with backoff (kept pending), then sent; after the last attempt, failed."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from emporium_common import testing
from emporium_notifications.config import NotificationsSettings
from emporium_notifications.mailer import Mailer
from emporium_testbed.process import free_port

ALEMBIC_INI = Path(__file__).resolve().parents[1] / "alembic.ini"


@pytest.fixture(scope="module")
async def mailer_db(postgres) -> str:
    """Its own database: the running stack's mailer must not pick these rows up."""
    url = testing.create_test_database(postgres, "mailer")
    await testing.migrate(ALEMBIC_INI, url)
    return url


async def insert_pending(engine, email: str) -> int:
    async with engine.begin() as conn:
        return (
            await conn.execute(
                sa.text(
                    "INSERT INTO notifications"
                    " (event_id, type, recipient_email, subject, body, text_body, status)"
                    " VALUES (:e, 'welcome', :r, 'Hello', '<p>Hello</p>', 'Hello', 'pending') RETURNING id"
                ),
                {"e": uuid.uuid4(), "r": email},
            )
        ).scalar_one()


async def row(engine, nid: int):
    async with engine.connect() as conn:
        return (await conn.execute(sa.text("SELECT * FROM notifications WHERE id = :id"), {"id": nid})).one()


async def test_failed_send_is_retried_not_dropped(mailer_db, smtp_sink):
    email = f"retry-{uuid.uuid4().hex[:6]}@example.com"
    down = NotificationsSettings(
        database_url=mailer_db, smtp_port=free_port(), mail_retry_base_seconds=0.3, mail_max_attempts=3
    )
    async with testing.engine_for(mailer_db) as engine:
        nid = await insert_pending(engine, email)
        mailer = Mailer(engine, down)
        await mailer.deliver_due(only_id=nid)
        first = await row(engine, nid)
        assert first.status == "pending" and first.attempts == 1 and first.error_message
        assert first.next_attempt_at is not None

        mailer.settings = down.model_copy(update={"smtp_host": smtp_sink.host, "smtp_port": smtp_sink.port})
        assert await mailer.deliver_due() == 0 or (await row(engine, nid)).status == "sent"  # not due yet
        await asyncio.sleep(0.5)
        await mailer.deliver_due()
        sent = await row(engine, nid)
        assert sent.status == "sent" and sent.attempts == 2 and sent.sent_at is not None
    mails = await asyncio.to_thread(smtp_sink.wait_for, 1, 10, email)
    assert len(mails) == 1 and mails[0].subject == "Hello"


async def test_send_fails_for_good_after_the_last_attempt(mailer_db):
    settings = NotificationsSettings(
        database_url=mailer_db, smtp_port=free_port(), mail_retry_base_seconds=0.01, mail_max_attempts=2
    )
    async with testing.engine_for(mailer_db) as engine:
        nid = await insert_pending(engine, "never@example.com")
        mailer = Mailer(engine, settings)
        await mailer.deliver_due(only_id=nid)
        await asyncio.sleep(0.05)
        await mailer.deliver_due(only_id=nid)
        final = await row(engine, nid)
    assert final.status == "failed" and final.attempts == 2
