"""Orders -> outbox -> RabbitMQ -> notifications -> SMTP + websockets, including a broker outage."""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import httpx
import pytest
import sqlalchemy as sa
from emporium_common import testing
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .conftest import new_user
from .test_consumer import notifications_for, wait_for


async def make_product(stack, admin, stock: int = 100, name: str = "Lamp") -> dict:
    async with httpx.AsyncClient(base_url=stack["products"].url, timeout=10) as client:
        body = {"name": name, "price": "12.50", "stock_quantity": stock, "sku": f"E-{uuid.uuid4().hex[:10]}"}
        response = await client.post("/products", json=body, headers=admin)
        assert response.status_code == 201, response.text
        return response.json()


async def place_order(stack, headers, product_id: int, quantity: int = 1) -> dict:
    async with httpx.AsyncClient(base_url=stack["orders"].url, timeout=15) as client:
        response = await client.post(
            "/orders", json={"items": [{"product_id": product_id, "quantity": quantity}]}, headers=headers
        )
        assert response.status_code == 201, response.text
        return response.json()


def ws_url(stack, token: str | None = None) -> str:
    url = stack["notifications"].url.replace("http://", "ws://") + "/ws/notifications"
    return f"{url}?token={token}" if token else url


async def next_notification(ws, timeout: float = 20.0) -> dict:  # noqa: ASYNC109
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if message["type"] == "notification":
            return message["data"]


async def test_websocket_requires_a_valid_token(stack, tokens):
    for url in (ws_url(stack), ws_url(stack, "not-a-jwt")):
        with pytest.raises(InvalidStatus):
            async with connect(url, open_timeout=5):
                pass
    headers = {"Authorization": f"Bearer {tokens.token('header-user')}"}
    async with connect(ws_url(stack), additional_headers=headers, open_timeout=5) as ws:
        assert json.loads(await ws.recv()) == {"type": "connected", "message": "Connected to notifications"}
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}


async def test_each_user_receives_only_their_own_order_events(stack, tokens, admin, smtp_sink):
    product = await make_product(stack, admin)
    alice, alice_email, alice_headers = new_user(tokens, "alice")
    bob, _, _ = new_user(tokens, "bob")
    async with (
        connect(ws_url(stack, tokens.token(alice, email=alice_email)), open_timeout=5) as alice_ws,
        connect(ws_url(stack, tokens.token(bob)), open_timeout=5) as bob_ws,
    ):
        for ws in (alice_ws, bob_ws):
            assert json.loads(await ws.recv())["type"] == "connected"
        order = await place_order(stack, alice_headers, product["id"], 2)
        data = await next_notification(alice_ws)
        assert data["event_type"] == "order_confirmation" and data["order_id"] == order["id"]
        assert data["message"] == f"Order #{order['id']} confirmed"

        async with httpx.AsyncClient(base_url=stack["orders"].url, timeout=10) as client:
            response = await client.patch(
                f"/orders/{order['id']}/status", json={"status": "confirmed"}, headers=admin
            )
            assert response.status_code == 200
        data = await next_notification(alice_ws)
        assert data["event_type"] == "order_status_update"
        assert data["message"] == f"Order #{order['id']}: pending → confirmed"

        # Bob saw none of it: the next thing on his socket is the answer to his ping.
        await bob_ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(bob_ws.recv(), 5)) == {"type": "pong"}

    mails = await asyncio.to_thread(smtp_sink.wait_for, 2, 20, alice_email)
    assert sorted(m.subject for m in mails) == sorted(
        [f"Order #{order['id']} Confirmed", f"Order #{order['id']} Status: Confirmed"]
    )


async def restart(rabbitmq, attempts: int = 3) -> None:
    """Start the stopped node again (a busy machine can make one start attempt fail: try again), then wait
    until quorum queues work again, so tests after this one find a fully recovered broker."""
    for attempt in range(1, attempts + 1):
        try:
            await asyncio.to_thread(rabbitmq.start)
            break
        except Exception:
            if attempt == attempts:
                raise
            await asyncio.to_thread(rabbitmq.stop)
            await asyncio.sleep(2)
    deadline = asyncio.get_running_loop().time() + 90
    while True:
        try:
            connection = await aio_pika.connect(rabbitmq.amqp_url, timeout=5)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(
                    f"readiness-{uuid.uuid4().hex[:8]}", durable=True, arguments={"x-queue-type": "quorum"}
                )
                await queue.delete(if_unused=False, if_empty=False)
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(1)


@pytest.mark.slow
async def test_broker_outage_delays_events_but_delivers_each_exactly_once(
    stack, tokens, admin, rabbitmq, smtp_sink, notifications_db
):
    product = await make_product(stack, admin, stock=50)
    _, email, headers = new_user(tokens, "outage")
    relay = stack["orders"].app.state.relay
    await asyncio.to_thread(rabbitmq.stop)
    try:
        orders = [await place_order(stack, headers, product["id"]) for _ in range(8)]
        async with testing.engine_for(stack["orders_db"]) as engine, engine.connect() as conn:
            unsent = (
                await conn.execute(sa.text("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
            ).scalar()
        assert unsent >= 8
        assert not relay.healthy
    finally:
        await restart(rabbitmq)
    order_ids = {o["id"] for o in orders}

    async def all_stored():
        rows = await notifications_for(notifications_db, recipient_email=email)
        return len(rows) >= len(order_ids)

    assert await wait_for(all_stored, 90, 0.5), "events were not delivered after the broker came back"
    mails = await asyncio.to_thread(smtp_sink.wait_for, len(order_ids), 30, email)
    await asyncio.sleep(1.5)  # duplicates, if any, would arrive now
    rows = await notifications_for(notifications_db, recipient_email=email)
    assert sorted(r.order_id for r in rows) == sorted(order_ids)
    assert all(r.status == "sent" for r in rows)
    mails = [m for m in smtp_sink.messages if email in m.rcpt_tos]
    assert sorted(m.subject for m in mails) == sorted(f"Order #{i} Confirmed" for i in order_ids)
    async with testing.engine_for(stack["orders_db"]) as engine, engine.connect() as conn:
        unsent = (
            await conn.execute(sa.text("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
        ).scalar()
    assert unsent == 0


async def test_websocket_accepts_the_bearer_subprotocol(stack, tokens):
    token = tokens.token("subprotocol-user")
    async with connect(ws_url(stack), subprotocols=["bearer", token], open_timeout=5) as ws:
        assert ws.subprotocol == "bearer"
        assert json.loads(await ws.recv())["type"] == "connected"


async def test_event_metrics_are_exported(stack):
    async with httpx.AsyncClient(timeout=10) as client:
        orders_metrics = (await client.get(stack["orders"].url + "/metrics")).text
        notifications_metrics = (await client.get(stack["notifications"].url + "/metrics")).text
    for name in ("emporium_outbox_backlog", "emporium_events_published_total"):
        assert name in orders_metrics
    for name in (
        "emporium_events_consumed_total",
        "emporium_events_dead_lettered_total",
        "emporium_notifications_emails_total",
        "emporium_notifications_websocket_connections",
    ):
        assert name in notifications_metrics


async def test_registration_in_the_users_service_sends_a_welcome_email(
    postgres, broker, stack, smtp_sink, tmp_path_factory
):
    from emporium_users.config import UsersSettings
    from emporium_users.keys import generate_local_keys
    from emporium_users.main import build_app as build_users

    from .conftest import SERVICES, serve

    users_db = testing.create_test_database(postgres, "e2e_users")
    await testing.migrate(SERVICES / "users" / "alembic.ini", users_db)
    keys = tmp_path_factory.mktemp("e2e-jwt-keys")
    generate_local_keys(keys)
    users = await serve(
        build_users(UsersSettings(database_url=users_db, jwt_keys_dir=keys, amqp_url=broker["users"]))
    )
    try:
        email = f"new-{uuid.uuid4().hex[:6]}@example.com"
        async with httpx.AsyncClient(base_url=users.url, timeout=15) as client:
            body = {
                "email": email,
                "username": f"u{uuid.uuid4().hex[:8]}",
                "password": "correct horse battery",
            }
            response = await client.post("/users/register", json=body)
            assert response.status_code == 201, response.text
        mails = await asyncio.to_thread(smtp_sink.wait_for, 1, 30, email)
        assert [m.subject for m in mails] == ["Welcome to Emporium"]
    finally:
        await users.stop()
