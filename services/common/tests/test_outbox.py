"""The transactional outbox: events commit with the data, the relay publishes each one with confirms."""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import pytest
import sqlalchemy as sa
from emporium_common.events import parse_envelope
from emporium_common.outbox import OutboxEvent, OutboxRelay, add_event
from sqlmodel.ext.asyncio.session import AsyncSession


@pytest.fixture(scope="module")
async def outbox_engine(common_engine):
    async with common_engine.begin() as conn:
        await conn.run_sync(lambda sync: OutboxEvent.__table__.create(sync, checkfirst=True))
    yield common_engine


@pytest.fixture
async def bound_queue(rabbitmq):
    name = f"outbox-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(rabbitmq.amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{name}.q", durable=True)
    await queue.bind(exchange, "#")
    yield name, queue
    await queue.delete(if_unused=False, if_empty=False)
    await exchange.delete()
    await connection.close()


async def test_event_commits_or_rolls_back_with_the_transaction(outbox_engine):
    kind = f"t.{uuid.uuid4().hex[:6]}"
    async with AsyncSession(outbox_engine) as session:
        add_event(session, kind, {"n": 1})
        await session.rollback()
    async with AsyncSession(outbox_engine) as session:
        envelope = add_event(session, kind, {"n": 2}, correlation_id="corr")
        await session.commit()
    async with outbox_engine.connect() as conn:
        rows = (await conn.execute(sa.text("SELECT payload FROM outbox WHERE type = :t"), {"t": kind})).all()
    assert [parse_envelope(json.dumps(r.payload)).data for r in rows] == [{"n": 2}]
    assert rows[0].payload["id"] == str(envelope.id) and rows[0].payload["correlation_id"] == "corr"


async def test_two_relays_publish_every_event_exactly_once(outbox_engine, rabbitmq, bound_queue):
    exchange_name, queue = bound_queue
    async with outbox_engine.begin() as conn:
        await conn.execute(sa.text("UPDATE outbox SET published_at = now() WHERE published_at IS NULL"))
    kind = f"burst.{uuid.uuid4().hex[:6]}"
    async with AsyncSession(outbox_engine) as session:
        ids = {add_event(session, kind, {"i": i}).id for i in range(60)}
        await session.commit()
    relays = [
        OutboxRelay(outbox_engine, rabbitmq.amqp_url, exchange=exchange_name, batch_size=7, poll_interval=0.1)
        for _ in range(2)
    ]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    received: list[str] = []
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(received) < 60 and asyncio.get_running_loop().time() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            received.append(parse_envelope(message.body).id)
        await asyncio.sleep(0.5)
        assert await queue.get(fail=False) is None  # nothing published twice
    finally:
        for relay in relays:
            relay.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert sorted(map(str, received)) == sorted(map(str, ids))
    assert await relays[0].backlog() == 0


@pytest.fixture
async def good_only_queue(rabbitmq):
    """An exchange with one queue bound for ``good.#`` only: anything else is unroutable."""
    name = f"outbox-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(rabbitmq.amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{name}.q", durable=True)
    await queue.bind(exchange, "good.#")
    yield name, queue
    await queue.delete(if_unused=False, if_empty=False)
    await exchange.delete()
    await connection.close()


async def _row(engine, event_id):
    async with engine.connect() as conn:
        return (
            await conn.execute(sa.text("SELECT * FROM outbox WHERE event_id = :e"), {"e": event_id})
        ).one()


async def test_poison_and_unroutable_rows_do_not_block_the_rows_behind_them(
    outbox_engine, rabbitmq, good_only_queue
):
    exchange_name, queue = good_only_queue
    async with outbox_engine.begin() as conn:
        await conn.execute(sa.text("UPDATE outbox SET published_at = now() WHERE published_at IS NULL"))
        # A row that is not an envelope at all (a bug, a bad manual insert).
        poison_id = uuid.uuid4()
        await conn.execute(
            sa.insert(OutboxEvent.__table__).values(event_id=poison_id, type="good.poison", payload={"x": 1})
        )
    async with AsyncSession(outbox_engine) as session:
        lost = add_event(session, "nobody.listens", {"n": 1})  # unroutable: no queue bound for it
        good = add_event(session, "good.event", {"n": 2})
        await session.commit()
    relay = OutboxRelay(
        outbox_engine, rabbitmq.amqp_url, exchange=exchange_name, max_attempts=2, retry_base=0.1
    )
    connection = await aio_pika.connect(rabbitmq.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        assert await relay.publish_batch(exchange) == 1
        message = await queue.get(timeout=5)
        await message.ack()
        assert parse_envelope(message.body).id == good.id
        poison = await _row(outbox_engine, poison_id)
        assert poison.parked_at is not None and "not a valid envelope" in poison.last_error
        first = await _row(outbox_engine, lost.id)
        # Returned by the broker: kept (not marked published), retried later, not parked yet.
        assert first.published_at is None and first.parked_at is None and first.attempts == 1
        assert first.next_attempt_at is not None
        async with outbox_engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE outbox SET next_attempt_at = now() WHERE event_id = :e"), {"e": lost.id}
            )
        assert await relay.publish_batch(exchange) == 0
        second = await _row(outbox_engine, lost.id)
        assert second.published_at is None and second.parked_at is not None and second.attempts == 2
        assert await relay.publish_batch(exchange) == 0  # parked rows are not tried again
    finally:
        await connection.close()
    assert await relay.backlog() == 0
    from emporium_common.outbox import OUTBOX_PARKED

    assert OUTBOX_PARKED._value.get() >= 2
