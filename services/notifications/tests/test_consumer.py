"""The consumer on a real broker: idempotent storage, email once, dead-lettering of poison messages."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import httpx
import pytest
import sqlalchemy as sa
from emporium_common import testing
from emporium_common.events import build_envelope, get_exchange, publish


async def publish_raw(amqp_url: str, body: bytes, routing_key: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await get_exchange(channel)
        await exchange.publish(aio_pika.Message(body), routing_key=routing_key)


async def publish_envelope(amqp_url: str, envelope) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await publish(await get_exchange(channel), envelope)


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(interval)


async def notifications_for(db_url: str, **where) -> list:
    async with testing.engine_for(db_url) as engine, engine.connect() as conn:
        clause = " AND ".join(f"{k} = :{k}" for k in where) or "true"
        return (await conn.execute(sa.text(f"SELECT * FROM notifications WHERE {clause}"), where)).all()  # noqa: S608


def order_created(user: str, email: str, order_id: int, name: str = "Mug"):
    return build_envelope(
        "order.created",
        {
            "order_id": order_id,
            "user_id": user,
            "user_email": email,
            "status": "pending",
            "total_amount": "19.98",
            "items": [
                {"product_id": 1, "product_name": name, "quantity": 2, "price": "9.99", "subtotal": "19.98"}
            ],
        },
    )


async def test_redelivered_event_is_stored_and_emailed_once(stack, broker, smtp_sink, notifications_db):
    email = f"once-{uuid.uuid4().hex[:6]}@example.com"
    envelope = order_created("u-once", email, 9001, name="<b>Mug</b>")
    for _ in range(3):
        await publish_envelope(broker["admin"], envelope)
    mails = await asyncio.to_thread(smtp_sink.wait_for, 1, 20, email)
    assert len(mails) == 1
    assert mails[0].subject == "Order #9001 Confirmed"
    assert "&lt;b&gt;Mug&lt;/b&gt;" in mails[0].text()  # autoescaped
    await asyncio.sleep(1.0)  # give the duplicates time to (not) show up
    rows = await notifications_for(notifications_db, recipient_email=email)
    assert len(rows) == 1
    assert rows[0].status == "sent" and rows[0].attempts == 1 and rows[0].sent_at is not None
    assert "Mug" in rows[0].body
    assert len([m for m in smtp_sink.messages if email in m.rcpt_tos]) == 1


async def test_poison_message_goes_to_the_dead_letter_queue(stack, broker, declarer):
    declarer.purge("notifications.dlq")
    await publish_raw(broker["admin"], b"\x00 not json", "order.created")
    await publish_envelope(broker["admin"], build_envelope("order.created", {"order_id": "not-a-number"}))

    async def dead_lettered():
        info = await asyncio.to_thread(declarer.queue_info, "notifications.dlq")
        return info.get("messages", 0) >= 2

    assert await wait_for(dead_lettered, 30, 0.5)
    info = await asyncio.to_thread(declarer.queue_info, "notifications.events")
    assert info.get("messages", 0) == 0


async def test_status_update_event_reaches_the_customer(stack, broker, smtp_sink):
    email = f"status-{uuid.uuid4().hex[:6]}@example.com"
    await publish_envelope(
        broker["admin"],
        build_envelope(
            "order.status.updated",
            {
                "order_id": 77,
                "user_id": "u-s",
                "user_email": email,
                "old_status": "pending",
                "new_status": "shipped",
            },
        ),
    )
    mails = await asyncio.to_thread(smtp_sink.wait_for, 1, 20, email)
    assert [m.subject for m in mails] == ["Order #77 Status: Shipped"]


async def test_services_cannot_configure_the_broker(broker):
    refused = (Exception, asyncio.CancelledError)  # aiormq reports ACCESS_REFUSED as either
    connection = await aio_pika.connect(broker["notifications"])
    async with connection:
        channel = await connection.channel()
        with pytest.raises(refused, match="ACCESS_REFUSED"):
            await channel.declare_queue("sneaky", durable=True)
    connection = await aio_pika.connect(broker["orders"])
    async with connection:
        channel = await connection.channel()
        with pytest.raises(refused, match="ACCESS_REFUSED"):
            await channel.declare_exchange("sneaky", "topic")
        channel = await connection.channel()
        with pytest.raises(refused, match="ACCESS_REFUSED"):
            queue = await channel.get_queue("notifications.events", ensure=False)
            await queue.consume(lambda message: None)  # no read on others' queues


async def test_rest_api_shows_own_notifications_and_admin_retry(
    stack, broker, tokens, admin, smtp_sink, notifications_db
):
    base = stack["notifications"].url
    user, email = f"rest-{uuid.uuid4().hex[:6]}", f"rest-{uuid.uuid4().hex[:6]}@example.com"
    await publish_envelope(broker["admin"], order_created(user, email, 4242))
    await asyncio.to_thread(smtp_sink.wait_for, 1, 20, email)
    own = tokens.auth_header(user, email=email)
    other = tokens.auth_header("someone-else")
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        listed = (await client.get("/notifications", headers=own)).json()
        assert listed["total"] == 1 and listed["notifications"][0]["recipient_email"] == email
        nid = listed["notifications"][0]["id"]
        assert (await client.get("/notifications", headers=other)).json()["total"] == 0
        assert (
            await client.get("/notifications", params={"recipient": email}, headers=own)
        ).status_code == 403
        by_admin = (await client.get("/notifications", params={"recipient": email}, headers=admin)).json()
        assert by_admin["total"] == 1
        assert (await client.get(f"/notifications/{nid}", headers=own)).json()["body"]
        assert (await client.get(f"/notifications/{nid}", headers=other)).status_code == 404
        assert (await client.get("/notifications")).status_code == 401
        assert (await client.post(f"/notifications/retry/{nid}", headers=own)).status_code == 403
        response = await client.post(f"/notifications/retry/{nid}", headers=admin)
        assert (
            response.status_code == 400
            and response.json()["detail"] == "Only failed notifications can be retried"
        )

        async with testing.engine_for(notifications_db) as engine, engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE notifications SET status = 'failed' WHERE id = :id"), {"id": nid}
            )
        smtp_sink.clear()
        response = await client.post(f"/notifications/retry/{nid}", headers=admin)
        assert response.status_code == 200 and response.json()["status"] == "sent"
        mails = await asyncio.to_thread(smtp_sink.wait_for, 1, 10, email)
        assert len(mails) == 1 and "4242" in mails[0].subject


async def test_user_registered_sends_a_welcome_email(stack, broker, smtp_sink, notifications_db):
    email = f"welcome-{uuid.uuid4().hex[:6]}@example.com"
    await publish_envelope(
        broker["admin"], build_envelope("user.registered", {"user_id": 12, "email": email, "username": "ada"})
    )
    mails = await asyncio.to_thread(smtp_sink.wait_for, 1, 20, email)
    assert [m.subject for m in mails] == ["Welcome to Emporium"]
    assert "ada" in mails[0].text()
    rows = await notifications_for(notifications_db, recipient_email=email)
    assert len(rows) == 1 and rows[0].type == "welcome" and rows[0].user_id == "12"
