"""Smoke tests: the throwaway Postgres, RabbitMQ and SMTP sink are the real servers."""

from __future__ import annotations

import json
import smtplib
from email.message import EmailMessage

import aio_pika
import asyncpg


async def test_postgres_creates_database_and_role(postgres):
    postgres.psql("CREATE ROLE smoke_owner LOGIN PASSWORD 'smoke-secret-pw'")
    postgres.create_database("smoke_db", owner="smoke_owner")
    conn = await asyncpg.connect(postgres.dsn("smoke_db", user="smoke_owner", password="smoke-secret-pw"))
    try:
        assert await conn.fetchval("SELECT current_database()") == "smoke_db"
        assert await conn.fetchval("SELECT current_user") == "smoke_owner"
        assert (await conn.fetchval("SHOW server_version")).startswith("15.")
    finally:
        await conn.close()


async def test_rabbitmq_quorum_queue_round_trip(rabbitmq):
    rabbitmq.api(
        "PUT", "/api/queues/%2F/smoke.quorum", {"durable": True, "arguments": {"x-queue-type": "quorum"}}
    )
    queue_info = rabbitmq.api("GET", "/api/queues/%2F/smoke.quorum")
    assert queue_info["type"] == "quorum"

    connection = await aio_pika.connect(rabbitmq.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body=json.dumps({"hello": "emporium"}).encode()), routing_key="smoke.quorum"
        )
        queue = await channel.get_queue("smoke.quorum", ensure=False)
        message = await queue.get(timeout=10)
        await message.ack()
        assert json.loads(message.body) == {"hello": "emporium"}


def test_rabbitmq_survives_restart_with_data(rabbitmq):
    rabbitmq.api("PUT", "/api/queues/%2F/smoke.durable", {"durable": True})
    rabbitmq.stop(with_epmd=False)
    assert not rabbitmq.running()
    rabbitmq.start()
    assert rabbitmq.api("GET", "/api/queues/%2F/smoke.durable")["durable"] is True


def test_email_arrives_at_sink(smtp_sink):
    message = EmailMessage()
    message["From"] = "shop@emporium.test"
    message["To"] = "buyer@emporium.test"
    message["Subject"] = "Order #1 Confirmed"
    message.set_content("Thanks for your order")
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as smtp:
        smtp.send_message(message)
    received = smtp_sink.wait_for(1, to="buyer@emporium.test")
    assert received[-1].subject == "Order #1 Confirmed"
    assert "Thanks for your order" in received[-1].text()
    assert list(smtp_sink.maildir.glob("*.eml"))
