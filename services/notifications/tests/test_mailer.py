"""A failed SMTP send is retried with backoff (kept pending), then sent; after the last attempt, failed."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from emporium_common import testing
from emporium_notifications.config import NotificationsSettings
from emporium_notifications.consumer import prune_processed_events
from emporium_notifications.mailer import Mailer, build_message
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


async def test_each_email_commits_on_its_own_so_a_crash_resends_at_most_one(mailer_db):
    settings = NotificationsSettings(database_url=mailer_db, smtp_port=free_port())
    async with testing.engine_for(mailer_db) as engine:
        async with engine.begin() as conn:  # other tests' leftovers are not due any more
            await conn.execute(sa.text("UPDATE notifications SET status = 'failed' WHERE status = 'pending'"))
        ids = [await insert_pending(engine, f"crash-{i}@example.com") for i in range(3)]
        mailer = Mailer(engine, settings)
        sent: list[str] = []

        async def send(message):
            if len(sent) == 2:
                raise asyncio.CancelledError  # the process dies while sending the third email
            sent.append(message["Message-ID"])

        mailer.send = send  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await mailer.deliver_due()
        statuses = [(await row(engine, nid)).status for nid in ids]
        assert statuses == ["sent", "sent", "pending"]  # only the email in flight will be sent again
        third = await row(engine, ids[2])
    assert len(set(sent)) == 2
    assert build_message(settings, third)["Message-ID"] == build_message(settings, third)["Message-ID"]
    assert build_message(settings, third)["Message-ID"] == f"<notification-{third.event_id}@emporium.local>"


async def test_processed_event_ids_are_pruned_after_the_retention(mailer_db):
    async with testing.engine_for(mailer_db) as engine:
        old, new = uuid.uuid4(), uuid.uuid4()
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO processed_events (event_id, type, processed_at)"
                    " VALUES (:o, 'order.created', now() - interval '8 days'), (:n, 'order.created', now())"
                ),
                {"o": old, "n": new},
            )
        assert await prune_processed_events(engine, 7 * 24 * 3600) >= 1
        async with engine.connect() as conn:
            left = set((await conn.execute(sa.text("SELECT event_id FROM processed_events"))).scalars())
    assert new in left and old not in left


async def test_one_smtp_connection_serves_many_emails_and_a_dropped_one_is_replaced(mailer_db, smtp_sink):
    settings = NotificationsSettings(
        database_url=mailer_db, smtp_host=smtp_sink.host, smtp_port=smtp_sink.port
    )
    tag = uuid.uuid4().hex[:6]
    async with testing.engine_for(mailer_db) as engine:
        async with engine.begin() as conn:  # other tests' leftovers are not due any more
            await conn.execute(sa.text("UPDATE notifications SET status = 'failed' WHERE status = 'pending'"))
        for i in range(3):
            await insert_pending(engine, f"kept-{i}-{tag}@example.com")
        mailer = Mailer(engine, settings)
        opened = []
        connect = mailer._connect

        async def counting_connect():
            opened.append(await connect())
            return opened[-1]

        mailer._connect = counting_connect  # type: ignore[method-assign]
        assert await mailer.deliver_due() == 3
        assert len(opened) == 1  # one connection (EHLO once) for the three emails

        opened[0].close()  # the server (or something between) dropped the kept connection
        nid = await insert_pending(engine, f"kept-3-{tag}@example.com")
        assert await mailer.deliver_due() == 1
        assert len(opened) == 2 and (await row(engine, nid)).attempts == 1  # replaced, not a failed attempt
        await mailer.close_smtp()
    mails = await asyncio.to_thread(smtp_sink.wait_for, 4, 10)
    assert {f"kept-{i}-{tag}@example.com" for i in range(4)} <= {r for m in mails for r in m.rcpt_tos}
