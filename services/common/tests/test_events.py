"""Envelope, publishing with confirms, and the consumer's retry/backoff/dead-letter semantics on RabbitMQ."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid

import aio_pika
import pytest
from emporium_common.events import (
    EventConsumer,
    InvalidEventError,
    PermanentEventError,
    backoff_delay,
    build_envelope,
    parse_envelope,
    publish,
)


def test_envelope_round_trip_and_contract_fields():
    envelope = build_envelope("order.created", {"total_amount": "10.00"}, correlation_id="req-1")
    raw = json.loads(envelope.to_json())
    assert set(raw) == {"id", "type", "version", "occurred_at", "correlation_id", "traceparent", "data"}
    assert raw["version"] == 1 and raw["correlation_id"] == "req-1"
    assert parse_envelope(envelope.to_json()) == envelope


@pytest.mark.parametrize("body", [b"", b"\xff", b"[]", b'{"type": ""}', b'{"id": "x", "type": "a"}'])
def test_parse_rejects_non_envelopes(body):
    with pytest.raises(InvalidEventError):
        parse_envelope(body)


def test_backoff_grows_and_is_capped():
    assert 0.25 <= backoff_delay(1, 0.5, 30) <= 0.5
    assert 2.0 <= backoff_delay(4, 0.5, 30) <= 4.0
    assert backoff_delay(50, 0.5, 30) <= 30


@pytest.fixture
async def queue_with_dlq(rabbitmq):
    """An exchange and a quorum queue with a dead-letter queue, declared by the admin (like the operator)."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(rabbitmq.amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(f"{name}.dlx", aio_pika.ExchangeType.TOPIC, durable=True)
    dlq = await channel.declare_queue(f"{name}.dlq", durable=True)
    await dlq.bind(dlx, "#")
    queue = await channel.declare_queue(
        f"{name}.events",
        durable=True,
        arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": f"{name}.dlx"},
    )
    await queue.bind(exchange, "#")
    yield name, channel, dlq
    await queue.delete(if_unused=False, if_empty=False)
    await dlq.delete(if_unused=False, if_empty=False)
    await exchange.delete()
    await dlx.delete()
    await connection.close()


async def _publish(rabbitmq, exchange_name: str, envelope) -> None:
    connection = await aio_pika.connect(rabbitmq.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await publish(await channel.get_exchange(exchange_name, ensure=False), envelope)


async def _dlq_count(dlq, expected: int, timeout: float = 20.0) -> int:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        declared = await dlq.channel.declare_queue(dlq.name, passive=True)
        count = declared.declaration_result.message_count
        if count >= expected or asyncio.get_running_loop().time() > deadline:
            return count
        await asyncio.sleep(0.2)


async def test_consumer_retries_with_backoff_then_dead_letters(rabbitmq, queue_with_dlq):
    name, _, dlq = queue_with_dlq
    attempts: list[float] = []

    async def always_fails(envelope):
        attempts.append(asyncio.get_running_loop().time())
        raise RuntimeError("database down")

    consumer = EventConsumer(
        rabbitmq.amqp_url, f"{name}.events", always_fails, max_attempts=4, backoff_base=0.1
    )
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(consumer.connected.wait(), 10)
        await _publish(rabbitmq, name, build_envelope("thing.happened", {}))
        assert await _dlq_count(dlq, 1) == 1
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
    assert len(attempts) == 4
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.04 for gap in gaps)  # waited (jittered backoff) before each retry


async def test_consumer_recovers_after_a_transient_failure_and_dead_letters_permanent_ones(
    rabbitmq, queue_with_dlq
):
    name, _, dlq = queue_with_dlq
    seen: dict[str, int] = {}
    handled = asyncio.Event()

    async def handler(envelope):
        seen[envelope.type] = seen.get(envelope.type, 0) + 1
        if envelope.type == "bad.event":
            raise PermanentEventError("never processable")
        if seen[envelope.type] == 1:
            raise RuntimeError("transient")
        handled.set()

    consumer = EventConsumer(rabbitmq.amqp_url, f"{name}.events", handler, max_attempts=5, backoff_base=0.05)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(consumer.connected.wait(), 10)
        await _publish(rabbitmq, name, build_envelope("bad.event", {}))
        await _publish(rabbitmq, name, build_envelope("good.event", {}))
        await asyncio.wait_for(handled.wait(), 20)
        assert await _dlq_count(dlq, 1) == 1
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
    assert seen == {"bad.event": 1, "good.event": 2}


@pytest.fixture
async def queue_with_retry(queue_with_dlq):
    """queue_with_dlq plus the delay queue of the notifications topology: ``<name>.retry`` (direct) routes
    "retry" into the delay queue, whose expired messages come back through it ("events") to the queue."""
    name, channel, dlq = queue_with_dlq
    retry = await channel.declare_exchange(f"{name}.retry", aio_pika.ExchangeType.DIRECT, durable=True)
    delay = await channel.declare_queue(
        f"{name}.delay",
        durable=True,
        arguments={"x-dead-letter-exchange": f"{name}.retry", "x-dead-letter-routing-key": "events"},
    )
    await delay.bind(retry, "retry")
    events = await channel.declare_queue(f"{name}.events", passive=True)
    await events.bind(retry, "events")
    yield name, dlq
    await delay.delete(if_unused=False, if_empty=False)
    await retry.delete()


async def test_a_retry_waits_in_the_delay_queue_not_in_the_consumer(rabbitmq, queue_with_retry):
    name, dlq = queue_with_retry
    handled: dict[str, list[float]] = {}
    done = asyncio.Event()

    async def handler(envelope):
        handled.setdefault(envelope.type, []).append(asyncio.get_running_loop().time())
        if envelope.type == "slow.event" and len(handled["slow.event"]) < 3:
            raise RuntimeError("transient")
        if {"slow.event", "fast.event"} <= handled.keys() and len(handled["slow.event"]) == 3:
            done.set()

    # One prefetch slot and a long backoff: holding the failed message would stall the next one for ~1 s.
    consumer = EventConsumer(
        rabbitmq.amqp_url,
        f"{name}.events",
        handler,
        prefetch=1,
        max_attempts=5,
        backoff_base=1.0,
        retry_exchange=f"{name}.retry",
    )
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(consumer.connected.wait(), 10)
        start = asyncio.get_running_loop().time()
        await _publish(rabbitmq, name, build_envelope("slow.event", {}))
        await _publish(rabbitmq, name, build_envelope("fast.event", {}))
        await asyncio.wait_for(done.wait(), 30)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
    assert handled["fast.event"][0] - start < 0.4  # not behind the failed one's backoff
    slow = handled["slow.event"]
    assert len(slow) == 3 and slow[1] - slow[0] >= 0.4  # it did wait (in the delay queue)
    assert await _dlq_count(dlq, 0, timeout=0) == 0


async def test_trace_context_crosses_the_broker(rabbitmq, queue_with_dlq):
    """The relay publishes outside the request that created the event: its producer span still joins
    that request's trace (the envelope's traceparent), and the consumer's span continues from the publish
    span (the message headers), so one trace runs from the request to the handler."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    name, _, _ = queue_with_dlq
    handled: list = []
    done = asyncio.Event()

    async def handler(envelope):
        handled.append(trace.get_current_span().get_span_context())
        done.set()

    with provider.get_tracer("test").start_as_current_span("POST /things") as request:
        envelope = build_envelope("thing.happened", {})
    consumer = EventConsumer(rabbitmq.amqp_url, f"{name}.events", handler)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(consumer.connected.wait(), 10)
        await _publish(rabbitmq, name, envelope)  # like the relay: no span is current here
        await asyncio.wait_for(done.wait(), 20)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
    finished = {s.name: s for s in spans.get_finished_spans()}
    produced, consumed = finished[f"{name} publish"], finished[f"{name}.events process"]
    trace_id = request.get_span_context().trace_id
    assert produced.context.trace_id == consumed.context.trace_id == handled[0].trace_id == trace_id
    assert produced.parent.span_id == request.get_span_context().span_id
    assert consumed.parent.span_id == produced.context.span_id
    assert produced.kind == trace.SpanKind.PRODUCER and consumed.kind == trace.SpanKind.CONSUMER
