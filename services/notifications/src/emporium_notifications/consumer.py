"""The event handler: store the notification once per event id, then wake the mailer and the websockets."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from emporium_common.events import Envelope
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import Notification, ProcessedEvent
from .realtime import CHANNEL
from .rendering import render

_N = Notification.__table__  # type: ignore[attr-defined]
_P = ProcessedEvent.__table__  # type: ignore[attr-defined]

# One statement, so one round trip and its own transaction (autocommit): the event id is recorded, and only
# if it is new, the notification is stored and (with a user to push to) announced with pg_notify, whose
# payload gets the new row's id. All of it commits together or not at all.
_RECORD = sa.text(
    "INSERT INTO processed_events (event_id, type) VALUES (:event_id, :event_type)"
    " ON CONFLICT (event_id) DO NOTHING"
)
_STORE = """
WITH first_time AS (
    INSERT INTO processed_events (event_id, type) VALUES (:event_id, :event_type)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
), stored AS (
    INSERT INTO notifications (
        event_id, type, recipient_email, subject, body, text_body, order_id, user_id, status, error_message
    )
    SELECT event_id, CAST(:type AS varchar), CAST(:recipient AS varchar), CAST(:subject AS varchar),
        CAST(:body AS text), CAST(:text_body AS text), CAST(:order_id AS integer), CAST(:user_id AS varchar),
        CAST(:status AS varchar), CAST(:error AS text)
    FROM first_time
    RETURNING id
)
"""
# (constant SQL only: every value is a bound parameter)
_STORE_QUIET = sa.text(_STORE + "SELECT id FROM stored")  # noqa: S608
_STORE_AND_NOTIFY = sa.text(
    _STORE  # noqa: S608
    + "SELECT id, pg_notify(:channel,"
    " left((CAST(:payload AS jsonb) || jsonb_build_object('id', id))::text, 7000)) FROM stored"
)


def make_handler(engine: AsyncEngine, on_stored: Callable[[uuid.UUID], None] = lambda _: None):
    async def handle(envelope: Envelope) -> None:
        rendered = render(envelope)  # PermanentEventError for malformed data -> dead letter
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            ids = {"event_id": envelope.id, "event_type": envelope.type}
            if rendered is None:  # an event type without a notification
                await conn.execute(_RECORD, ids)
                return
            recipient = rendered.recipient.strip()
            row = {
                **ids,
                "type": rendered.type,
                "recipient": recipient[:255],
                "subject": rendered.subject[:255],
                "body": rendered.html,
                "text_body": rendered.text,
                "order_id": rendered.order_id,
                "user_id": rendered.user_id,
                "status": "pending" if recipient else "failed",
                "error": None if recipient else "No recipient address",
            }
            if rendered.user_id:
                payload = {
                    "user_id": rendered.user_id,
                    "event_id": str(envelope.id),
                    "event_type": rendered.type,
                    "subject": rendered.subject,
                    "message": rendered.message,
                    "order_id": rendered.order_id,
                    "timestamp": datetime.now(UTC).isoformat(),
                }
                row |= {"channel": CHANNEL, "payload": json.dumps(payload)}
            query = _STORE_AND_NOTIFY if rendered.user_id else _STORE_QUIET
            if (await conn.execute(query, row)).first() is None:
                return  # a redelivery: already stored
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
