"""The event handler: store the notification once per event id, then wake the mailer and the websockets."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from emporium_common.events import Envelope
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import Notification, ProcessedEvent
from .realtime import CHANNEL
from .rendering import render

_N = Notification.__table__  # type: ignore[attr-defined]
_P = ProcessedEvent.__table__  # type: ignore[attr-defined]


def make_handler(engine: AsyncEngine, on_stored: Callable[[uuid.UUID], None] = lambda _: None):
    async def handle(envelope: Envelope) -> None:
        rendered = render(envelope)  # PermanentEventError for malformed data -> dead letter
        async with engine.begin() as conn:
            first_time = (
                await conn.execute(
                    insert(_P)
                    .values(event_id=envelope.id, type=envelope.type)
                    .on_conflict_do_nothing(index_elements=["event_id"])
                    .returning(_P.c.event_id)
                )
            ).first()
            if first_time is None or rendered is None:
                return  # a redelivery (already stored), or an event type without a notification
            recipient = rendered.recipient.strip()
            notification_id = (
                await conn.execute(
                    sa.insert(_N)
                    .values(
                        event_id=envelope.id,
                        type=rendered.type,
                        recipient_email=recipient[:255],
                        subject=rendered.subject[:255],
                        body=rendered.html,
                        text_body=rendered.text,
                        order_id=rendered.order_id,
                        user_id=rendered.user_id,
                        status="pending" if recipient else "failed",
                        error_message=None if recipient else "No recipient address",
                    )
                    .returning(_N.c.id)
                )
            ).scalar_one()
            if rendered.user_id:
                payload = {
                    "user_id": rendered.user_id,
                    "id": notification_id,
                    "event_id": str(envelope.id),
                    "event_type": rendered.type,
                    "subject": rendered.subject,
                    "message": rendered.message,
                    "order_id": rendered.order_id,
                    "timestamp": datetime.now(UTC).isoformat(),
                }
                await conn.execute(sa.select(sa.func.pg_notify(CHANNEL, json.dumps(payload)[:7000])))
        on_stored(envelope.id)

    return handle


async def prune_processed_events(engine: AsyncEngine, older_than_seconds: float) -> int:
    """Forget event ids handled longer ago than any redelivery can come (the dedup table stays small)."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.delete(_P).where(
                _P.c.processed_at
                < sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, older_than_seconds)
            )
        )
    return result.rowcount or 0
