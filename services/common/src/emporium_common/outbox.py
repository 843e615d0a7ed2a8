"""Transactional outbox: events commit with the business rows, a relay publishes them with confirms.

- :class:`OutboxEvent` is the ``outbox`` table; every publishing service creates it in its own Alembic
  migrations with :func:`create_outbox_table` (and drops it with :func:`drop_outbox_table`).
- :func:`add_event` adds an event to the caller's session: it commits or rolls back with the order/user
  (:func:`event_row` gives its columns to a service that inserts them with a statement of its own).
- :class:`OutboxRelay` publishes unsent rows in id order, ``mandatory`` and with publisher confirms, and
  only then marks rows sent. Rows are claimed with ``FOR UPDATE SKIP LOCKED`` so several replicas can run
  relays. A broker outage leaves rows unsent (delayed, never lost); a crash between the confirm and the
  commit republishes a row, so delivery is at least once and consumers deduplicate on the envelope id.
- A row the broker cannot take (unroutable: no queue bound for its type yet; nacked) is retried with
  backoff (``next_attempt_at``) without holding up the rows behind it; a row that is not a valid envelope,
  or still fails after ``max_attempts``, is *parked* (``parked_at``, ``last_error``): it is no longer
  tried, ``emporium_outbox_parked_events`` counts it and the ``EmporiumOutboxParked`` alert fires. Replay it
  after fixing the cause with ``UPDATE outbox SET parked_at = NULL, attempts = 0 WHERE id = ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import sqlalchemy as sa
from aiormq.exceptions import DeliveryError
from prometheus_client import Counter, Gauge
from pydantic import ValidationError
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Field, SQLModel

from .events import (
    EXCHANGE,
    Envelope,
    UnroutableEventError,
    backoff_delay,
    build_envelope,
    get_exchange,
    publish,
)

log = logging.getLogger("emporium.outbox")

OUTBOX_BACKLOG = Gauge("emporium_outbox_backlog", "Outbox events not yet confirmed by the broker")
OUTBOX_OLDEST_AGE = Gauge(
    "emporium_outbox_oldest_age_seconds", "Age of the oldest outbox event not yet confirmed by the broker"
)
OUTBOX_PARKED = Gauge(
    "emporium_outbox_parked_events",
    "Outbox events parked (invalid, or refused by the broker too often): not retried",
)
OUTBOX_PARKED_TOTAL = Counter("emporium_outbox_parked_total", "Outbox events parked, by reason", ["reason"])
OUTBOX_RETRIED = Counter(
    "emporium_outbox_retried_total", "Outbox events the broker refused (unroutable, nacked), retried later"
)


class OutboxEvent(SQLModel, table=True):
    __tablename__ = "outbox"

    id: int | None = Field(
        default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True)
    )
    event_id: uuid.UUID = Field(sa_column=sa.Column(sa.Uuid, nullable=False, unique=True))
    type: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    payload: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    created_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC),
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    published_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    next_attempt_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    parked_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))


def create_outbox_table(op: Any) -> None:
    """Call from a service's Alembic migration (``op`` is ``alembic.op``)."""
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.Uuid, nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    # The relay only ever looks at unsent rows: a small partial index keeps that cheap.
    op.create_index(
        "ix_outbox_unpublished", "outbox", ["id"], postgresql_where=sa.text("published_at IS NULL")
    )


def drop_outbox_table(op: Any) -> None:
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")


def add_outbox_parking(op: Any) -> None:
    """Migration step after :func:`create_outbox_table`: per-row retry time and parking of poison rows."""
    op.add_column("outbox", sa.Column("next_attempt_at", sa.DateTime(timezone=True)))
    op.add_column("outbox", sa.Column("parked_at", sa.DateTime(timezone=True)))
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        postgresql_where=sa.text("published_at IS NULL AND parked_at IS NULL"),
    )


def drop_outbox_parking(op: Any) -> None:
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.create_index(
        "ix_outbox_unpublished", "outbox", ["id"], postgresql_where=sa.text("published_at IS NULL")
    )
    op.drop_column("outbox", "parked_at")
    op.drop_column("outbox", "next_attempt_at")


def add_event(
    session: Any,
    type: str,
    data: dict[str, Any],
    *,
    version: int = 1,
    correlation_id: str | None = None,
    traceparent: str | None = None,
) -> Envelope:
    """Add an event to ``session``'s transaction (nothing is sent until it commits and the relay runs)."""
    envelope = build_envelope(
        type, data, version=version, correlation_id=correlation_id, traceparent=traceparent
    )
    session.add(OutboxEvent(**event_row(envelope)))
    return envelope


def event_row(envelope: Envelope) -> dict[str, Any]:
    """The ``outbox`` columns of an event, for an INSERT of one's own in the business transaction."""
    return {
        "event_id": envelope.id,
        "type": envelope.type,
        "payload": envelope.model_dump(mode="json"),
        "created_at": envelope.occurred_at,
    }


_TABLE = OutboxEvent.__table__  # type: ignore[attr-defined]


class OutboxRelay:
    """Publish the outbox to the broker; run one per process (several replicas are safe)."""

    def __init__(
        self,
        engine: AsyncEngine,
        amqp_url: str,
        *,
        exchange: str = EXCHANGE,
        batch_size: int = 100,
        poll_interval: float = 0.5,
        reconnect_max: float = 10.0,
        retention_seconds: float = 7 * 24 * 3600,
        max_attempts: int = 10,
        retry_base: float = 1.0,
        retry_max: float = 300.0,
    ) -> None:
        self.engine, self.amqp_url, self.exchange_name = engine, amqp_url, exchange
        self.max_attempts, self.retry_base, self.retry_max = max_attempts, retry_base, retry_max
        self.batch_size, self.poll_interval, self.reconnect_max = batch_size, poll_interval, reconnect_max
        self.retention_seconds = retention_seconds
        self.connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    @property
    def healthy(self) -> bool:
        return self.connected.is_set()

    def notify(self) -> None:
        """Wake the relay now (call after committing a transaction that added events)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def backlog(self) -> int:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        sa.func.count().filter(_TABLE.c.parked_at.is_(None)),
                        sa.func.min(_TABLE.c.created_at).filter(_TABLE.c.parked_at.is_(None)),
                        sa.func.count().filter(_TABLE.c.parked_at.is_not(None)),
                    ).where(_TABLE.c.published_at.is_(None))
                )
            ).one()
        count, oldest = int(row[0]), row[1]
        OUTBOX_BACKLOG.set(count)
        OUTBOX_PARKED.set(int(row[2]))
        OUTBOX_OLDEST_AGE.set((datetime.now(UTC) - oldest).total_seconds() if oldest else 0)
        return count

    async def publish_batch(self, exchange: aio_pika.abc.AbstractExchange) -> int:
        """Publish one batch of due rows; returns how many were confirmed.

        Rows the broker refuses one by one (unroutable, nacked) are retried later with backoff, or parked
        after ``max_attempts``; invalid rows are parked at once. Raises (the caller reconnects) only when
        the connection itself failed.
        """
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    sa.select(_TABLE.c.id, _TABLE.c.payload, _TABLE.c.attempts)
                    .where(
                        _TABLE.c.published_at.is_(None),
                        _TABLE.c.parked_at.is_(None),
                        sa.or_(_TABLE.c.next_attempt_at.is_(None), _TABLE.c.next_attempt_at <= sa.func.now()),
                    )
                    .order_by(_TABLE.c.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            valid: list[tuple[Any, Envelope]] = []
            for row in rows:
                try:
                    valid.append((row, Envelope.model_validate(row.payload)))
                except ValidationError as exc:
                    await self._park(conn, row.id, row.attempts, "invalid", f"not a valid envelope: {exc}")
            # One channel keeps publication order; confirms are awaited together for throughput.
            results = await asyncio.gather(
                *(publish(exchange, envelope) for _, envelope in valid), return_exceptions=True
            )
            sent = [row.id for (row, _), result in zip(valid, results, strict=True) if result is None]
            if sent:
                await conn.execute(
                    sa.update(_TABLE)
                    .where(_TABLE.c.id.in_(sent))
                    .values(
                        published_at=sa.func.now(),
                        attempts=_TABLE.c.attempts + 1,
                        last_error=None,
                        next_attempt_at=None,
                    )
                )
            lost: BaseException | None = None
            for (row, envelope), result in zip(valid, results, strict=True):
                if result is None:
                    continue
                if not isinstance(result, UnroutableEventError | DeliveryError):
                    lost = lost or result  # the connection failed: not this row's fault, not counted
                    continue
                attempts = row.attempts + 1
                error = repr(result)[:500]
                if attempts >= self.max_attempts:
                    await self._park(conn, row.id, attempts, "refused", error)
                    continue
                OUTBOX_RETRIED.inc()
                delay = backoff_delay(attempts, self.retry_base, self.retry_max)
                log.warning(
                    "broker refused outbox event %s (%s, attempt %d), retrying in %.0fs",
                    envelope.id,
                    error,
                    attempts,
                    delay,
                )
                await conn.execute(
                    sa.update(_TABLE)
                    .where(_TABLE.c.id == row.id)
                    .values(
                        attempts=attempts,
                        last_error=error,
                        next_attempt_at=sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, delay),
                    )
                )
        if lost is not None:
            raise ConnectionError(f"outbox events not confirmed: {lost!r}")
        return len(sent)

    async def _park(self, conn: Any, row_id: int, attempts: int, reason: str, error: str) -> None:
        log.error("parking outbox event row %s (%s): %s", row_id, reason, error[:300])
        OUTBOX_PARKED_TOTAL.labels(reason).inc()
        await conn.execute(
            sa.update(_TABLE)
            .where(_TABLE.c.id == row_id)
            .values(parked_at=sa.func.now(), attempts=attempts, last_error=error[:500])
        )

    async def prune(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.delete(_TABLE).where(
                    _TABLE.c.published_at
                    < sa.func.now() - sa.text(f"interval '{int(self.retention_seconds)} seconds'")
                )
            )

    async def run(self) -> None:
        """Publish until :meth:`stop`; broker or database failures back off and retry, never drop."""
        failures = 0
        delay = 0.0
        last_prune = 0.0
        last_gauges = -5.0
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            connection = None
            try:
                connection = await aio_pika.connect(self.amqp_url, timeout=10)
                # Confirms + mandatory: an event no queue is bound for comes back (it is retried, not lost).
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                exchange = await get_exchange(channel, self.exchange_name)
                self.connected.set()
                while not self._stop.is_set():
                    if connection.is_closed:
                        raise ConnectionError("broker connection closed")
                    published = await self.publish_batch(exchange)
                    failures = 0
                    if published >= self.batch_size:
                        continue  # more waiting: no sleep
                    if loop.time() - last_gauges >= 5:  # the gauges' query, not once per order
                        last_gauges = loop.time()
                        await self.backlog()
                    if loop.time() - last_prune > 3600:
                        last_prune = loop.time()
                        await self.prune()
                    await self._wait(self.poll_interval)
            except Exception as exc:
                failures += 1
                delay = backoff_delay(failures, 0.5, self.reconnect_max)
                log.warning("outbox relay failed (%r), retrying in %.1fs", exc, delay)
                with contextlib.suppress(Exception):  # already gone, or down
                    await self.backlog()
            finally:
                self.connected.clear()
                if connection is not None:
                    with contextlib.suppress(Exception):  # already gone, or down
                        await connection.close()
            if not self._stop.is_set() and failures:
                await self._wait(delay)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()
