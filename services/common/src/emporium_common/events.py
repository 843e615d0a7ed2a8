"""Domain events on RabbitMQ: the envelope, publishing with confirms, and an idempotent-friendly consumer.

Contract (docs/contracts.md): topic exchange ``emporium.events``, routing key = event type, JSON envelope
``{id, type, version, occurred_at, correlation_id, traceparent, data}``.

Services never declare broker objects (their users have no configure permission): everything here uses
passive access only (``get_exchange(..., ensure=False)`` / ``get_queue(..., ensure=False)``); the operator
declares exchanges, queues, bindings and dead-letter queues from each service's topology file.

Consumer semantics (:class:`EventConsumer`):
- a message that is not a valid envelope, or whose handler raises :class:`PermanentEventError`, is
  rejected without requeue, so the broker dead-letters it (the queue's dead-letter exchange);
- any other handler error is retried after an exponential backoff (jitter) without holding the consumer:
  with a ``retry_exchange`` the message is republished there with the delay as its expiration (a delay
  queue that dead-letters it back to the consumer's queue) and acked at once, so its prefetch slot serves
  other messages meanwhile; without one the consumer waits, then requeues. After ``max_attempts`` it is
  rejected -> dead-lettered. The attempt number is ``x-emporium-attempts`` (set when republished for a
  retry) plus the ``x-delivery-count`` quorum queues add on redelivery (their ``deliveryLimit`` is a
  broker-side backstop);
- handlers must be idempotent (record the envelope ``id``): delivery is at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from pamqp.commands import Basic
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("emporium.events")

EXCHANGE = "emporium.events"
ORDER_CREATED = "order.created"
ORDER_STATUS_UPDATED = "order.status.updated"
USER_REGISTERED = "user.registered"

EVENTS_PUBLISHED = Counter("emporium_events_published_total", "Events confirmed by the broker", ["type"])
EVENTS_PUBLISH_FAILURES = Counter(
    "emporium_events_publish_failures_total", "Event publications that failed (will be retried)", ["type"]
)
EVENTS_CONSUMED = Counter(
    "emporium_events_consumed_total",
    "Event deliveries handled by a consumer, by outcome (ok, retried, dead_lettered)",
    ["queue", "type", "outcome"],
)
EVENTS_DEAD_LETTERED = Counter(
    "emporium_events_dead_lettered_total",
    "Messages a consumer rejected to the dead-letter exchange",
    ["queue", "reason"],
)
EVENT_HANDLING_SECONDS = Histogram(
    "emporium_event_handling_seconds", "Time spent in an event handler", ["queue", "type"]
)


class InvalidEventError(ValueError):
    """The message body is not a valid envelope (never retried: dead-lettered at once)."""


class UnroutableEventError(Exception):
    """The broker returned a mandatory event: no queue is bound for its routing key (kept, retried)."""


class PermanentEventError(Exception):
    """Raised by a handler for an event it can never process (dead-lettered at once, no retries)."""


class Envelope(BaseModel):
    """The JSON envelope of every domain event. Money in ``data`` travels as strings."""

    model_config = ConfigDict(extra="ignore")

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: str = Field(min_length=1, max_length=100)
    version: int = Field(default=1, ge=1)
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    correlation_id: str | None = Field(default=None, max_length=200)
    traceparent: str | None = Field(default=None, max_length=200)
    data: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def current_correlation_id() -> str | None:
    """The request id of the HTTP request being served, if any."""
    try:
        from .request_id import get_request_id
    except ImportError:  # pragma: no cover - request ids are optional
        return None
    return get_request_id()


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (None without an active trace)."""
    try:
        from opentelemetry.propagate import inject
    except ImportError:  # pragma: no cover
        return None
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent")


def build_envelope(
    type: str,
    data: dict[str, Any],
    *,
    version: int = 1,
    correlation_id: str | None = None,
    traceparent: str | None = None,
    event_id: uuid.UUID | None = None,
) -> Envelope:
    """A new envelope; correlation id and trace context default to the current request's."""
    return Envelope(
        id=event_id or uuid.uuid4(),
        type=type,
        version=version,
        correlation_id=correlation_id if correlation_id is not None else current_correlation_id(),
        traceparent=traceparent if traceparent is not None else current_traceparent(),
        data=data,
    )


def parse_envelope(body: bytes | str) -> Envelope:
    """Parse a message body; raises :class:`InvalidEventError` for anything that is not an envelope."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEventError(f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidEventError("envelope must be a JSON object")
    try:
        return Envelope.model_validate(raw)
    except ValidationError as exc:
        raise InvalidEventError(f"invalid envelope: {exc.error_count()} error(s)") from exc


def to_message(envelope: Envelope) -> aio_pika.Message:
    return aio_pika.Message(
        body=envelope.to_json(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(envelope.id),
        type=envelope.type,
        correlation_id=envelope.correlation_id,
        timestamp=envelope.occurred_at,
        headers={"x-event-version": envelope.version}
        | ({"traceparent": envelope.traceparent} if envelope.traceparent else {}),
    )


async def get_exchange(channel: AbstractChannel, name: str = EXCHANGE) -> AbstractExchange:
    """Passive access: the exchange must have been declared by the operator (or a test's topology)."""
    return await channel.get_exchange(name, ensure=False)


async def publish(exchange: AbstractExchange, envelope: Envelope, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Publish ``mandatory`` and wait for the broker's confirm (the channel must have publisher confirms).

    Raises on a nack, a timeout or a lost connection, and :class:`UnroutableEventError` (or aiormq's
    ``PublishError`` on a channel with ``on_return_raises``) when no queue is bound for the event's type:
    the caller (the outbox relay) keeps the event.
    """
    message = to_message(envelope)
    with _producer_span(envelope, exchange.name) as headers:
        message.headers.update(headers)  # the publish span's context: the consumer continues from it
        try:
            confirmation = await exchange.publish(
                message, routing_key=envelope.type, mandatory=True, timeout=timeout
            )
            if confirmation is not None and not isinstance(confirmation, Basic.Ack):
                raise UnroutableEventError(
                    f"{envelope.type} was returned by the broker: no queue is bound for it"
                )
        except Exception:
            EVENTS_PUBLISH_FAILURES.labels(envelope.type).inc()
            raise
    EVENTS_PUBLISHED.labels(envelope.type).inc()


def tracing_active() -> bool:
    """Whether a tracer provider is set (tracing on). Without one every span is a no-op that still cost
    the consumer and the relay about a tenth of a millisecond each: they skip them."""
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover
        return False
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


@contextlib.contextmanager
def _producer_span(envelope: Envelope, exchange: str) -> Iterator[dict[str, str]]:
    """A producer span in the trace of the request that created the event (the envelope's traceparent:
    the outbox relay publishes later, outside that request); yields the headers that carry it on."""
    if not tracing_active():
        yield {}
        return
    from opentelemetry import trace
    from opentelemetry.propagate import extract, inject

    parent = extract({"traceparent": envelope.traceparent}) if envelope.traceparent else None
    with trace.get_tracer("emporium.events").start_as_current_span(
        f"{exchange} publish",
        context=parent,
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.destination.name": exchange,
            "messaging.rabbitmq.destination.routing_key": envelope.type,
            "messaging.message.id": str(envelope.id),
            "emporium.correlation_id": envelope.correlation_id or "",
        },
    ) as span:
        headers: dict[str, str] = {}
        if span.get_span_context().is_valid:
            inject(headers)
        yield headers


def backoff_delay(attempt: int, base: float = 0.5, maximum: float = 30.0) -> float:
    """Exponential backoff with full jitter for the given 1-based attempt number."""
    ceiling = min(maximum, base * (2 ** max(0, attempt - 1)))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


RETRY_ATTEMPTS_HEADER = "x-emporium-attempts"
RETRY_ROUTING_KEY = "retry"


def delivery_attempt(message: AbstractIncomingMessage) -> int:
    """1 for the first delivery; earlier ones are counted by our retry header (republished retries) and
    by ``x-delivery-count`` (quorum queues' redeliveries)."""
    headers = message.headers or {}
    try:
        retried = int(headers.get(RETRY_ATTEMPTS_HEADER) or 0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        retried = 0
    try:
        previous = int(headers.get("x-delivery-count") or 0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        previous = 0
    if previous == 0 and message.redelivered:
        previous = 1
    return retried + previous + 1


Handler = Callable[[Envelope], Awaitable[None]]


def _consumer_span(
    envelope: Envelope, queue: str, attempt: int, headers: dict[str, Any] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A consumer span continuing the publisher's trace, when tracing is on: the message headers' context
    (the publish span), else the envelope's traceparent (the request that created the event)."""
    if not tracing_active():
        return contextlib.nullcontext()
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    carrier = {k: str(v) for k, v in (headers or {}).items() if k in ("traceparent", "tracestate")}
    if "traceparent" not in carrier and envelope.traceparent:
        carrier = {"traceparent": envelope.traceparent}
    parent = extract(carrier) if carrier else None
    return trace.get_tracer("emporium.events").start_as_current_span(
        f"{queue} process",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.destination.name": queue,
            "messaging.message.id": str(envelope.id),
            "emporium.event.type": envelope.type,
            "emporium.event.attempt": attempt,
            "emporium.correlation_id": envelope.correlation_id or "",
        },
    )


async def _settle(settlement: Awaitable[None]) -> None:
    """Ack/nack/reject; if the channel is gone the broker redelivers the message anyway."""
    try:
        await settlement
    except Exception as exc:
        log.info("could not settle a message (%r); the broker will redeliver it", exc)


def _resolver(future: asyncio.Future[None]) -> Callable[..., None]:
    def resolve(*_: Any) -> None:
        if not future.done():
            future.set_result(None)

    return resolve


class EventConsumer:
    """Consume one queue with retries, backoff and dead-lettering; reconnects after broker outages."""

    def __init__(
        self,
        amqp_url: str,
        queue: str,
        handler: Handler,
        *,
        max_attempts: int = 5,
        prefetch: int = 16,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        reconnect_max: float = 10.0,
        retry_exchange: str | None = None,
    ) -> None:
        self.amqp_url, self.queue_name, self.handler = amqp_url, queue, handler
        self.retry_exchange_name = retry_exchange or None
        self._retry_exchange: AbstractExchange | None = None
        self.max_attempts, self.prefetch = max_attempts, prefetch
        self.backoff_base, self.backoff_max, self.reconnect_max = backoff_base, backoff_max, reconnect_max
        self.connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    @property
    def healthy(self) -> bool:
        return self.connected.is_set()

    async def _dead_letter(self, message: AbstractIncomingMessage, type_: str, reason: str) -> None:
        EVENTS_DEAD_LETTERED.labels(self.queue_name, reason).inc()
        EVENTS_CONSUMED.labels(self.queue_name, type_, "dead_lettered").inc()
        await _settle(message.reject(requeue=False))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = parse_envelope(message.body)
        except InvalidEventError as exc:
            log.warning(
                "dead-lettering an invalid message", extra={"queue": self.queue_name, "error": str(exc)}
            )
            await self._dead_letter(message, "invalid", "invalid")
            return
        attempt = delivery_attempt(message)
        try:
            with (
                _consumer_span(envelope, self.queue_name, attempt, dict(message.headers or {})),
                EVENT_HANDLING_SECONDS.labels(self.queue_name, envelope.type).time(),
            ):
                await self.handler(envelope)
                log.info(  # inside the consumer span: the line carries the event's trace id
                    "handled %s",
                    envelope.type,
                    extra={"event_id": str(envelope.id), "queue": self.queue_name, "attempt": attempt},
                )
        except PermanentEventError as exc:
            log.warning(
                "dead-lettering an event its handler refused",
                extra={"event_id": str(envelope.id), "type": envelope.type, "error": str(exc)},
            )
            await self._dead_letter(message, envelope.type, "permanent")
            return
        except Exception as exc:
            if attempt >= self.max_attempts:
                log.error(
                    "dead-lettering an event after %d attempts",
                    attempt,
                    extra={"event_id": str(envelope.id), "type": envelope.type, "error": repr(exc)},
                )
                await self._dead_letter(message, envelope.type, "attempts")
                return
            delay = backoff_delay(attempt, self.backoff_base, self.backoff_max)
            log.warning(
                "event handler failed (attempt %d/%d), retrying in %.2fs",
                attempt,
                self.max_attempts,
                delay,
                extra={"event_id": str(envelope.id), "type": envelope.type, "error": repr(exc)},
            )
            EVENTS_CONSUMED.labels(self.queue_name, envelope.type, "retried").inc()
            if await self._retry_later(message, attempt, delay):
                await _settle(message.ack())
                return
            await asyncio.sleep(delay)
            await _settle(message.nack(requeue=True))
            return
        EVENTS_CONSUMED.labels(self.queue_name, envelope.type, "ok").inc()
        await _settle(message.ack())

    async def _retry_later(self, message: AbstractIncomingMessage, attempt: int, delay: float) -> bool:
        """Republish to the delay queue (confirmed); False when that is not possible (then retry in place)."""
        exchange = self._retry_exchange
        if exchange is None:
            return False
        headers = {
            k: v for k, v in (message.headers or {}).items() if k not in ("x-delivery-count", "x-death")
        }
        retry = aio_pika.Message(
            body=message.body,
            headers={**headers, RETRY_ATTEMPTS_HEADER: attempt},
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            type=message.type,
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            expiration=max(0.001, delay),
        )
        try:
            await exchange.publish(retry, routing_key=RETRY_ROUTING_KEY, mandatory=True, timeout=10)
        except Exception as exc:
            log.warning("cannot republish for a delayed retry (%r); retrying in place", exc)
            return False
        return True

    async def run(self) -> None:
        """Consume until :meth:`stop`; on any broker failure wait (backoff) and reconnect."""
        failures = 0
        while not self._stop.is_set():
            try:
                connection = await aio_pika.connect(self.amqp_url, timeout=10)
            except Exception as exc:
                failures += 1
                delay = backoff_delay(failures, 0.5, self.reconnect_max)
                log.warning("consumer cannot connect to the broker (%r), retrying in %.1fs", exc, delay)
                await self._sleep(delay)
                continue
            self._connection = connection
            try:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=self.prefetch)
                queue = await channel.get_queue(self.queue_name, ensure=False)
                if self.retry_exchange_name:
                    publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
                    self._retry_exchange = await get_exchange(publisher, self.retry_exchange_name)
                await queue.consume(self._on_message)
                failures = 0
                self.connected.set()
                log.info("consuming %s", self.queue_name)
                # A connection the broker drops only fires close callbacks (closed() waits for close()).
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                connection.close_callbacks.add(_resolver(lost))
                channel.close_callbacks.add(_resolver(lost))
                stop_task = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({stop_task, lost}, return_when=asyncio.FIRST_COMPLETED)
                stop_task.cancel()
                if lost.done():
                    failures += 1
                    log.warning("consumer lost the broker connection, reconnecting")
            except Exception as exc:
                failures += 1
                log.warning("consumer lost the broker (%r)", exc)
            finally:
                self.connected.clear()
                self._connection = None
                self._retry_exchange = None
                with contextlib.suppress(Exception):  # already gone, or down
                    await connection.close()
            if not self._stop.is_set():
                await self._sleep(backoff_delay(max(failures, 1), 0.5, self.reconnect_max))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    def stop(self) -> None:
        self._stop.set()
