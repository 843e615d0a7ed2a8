"""Sending stored notifications over SMTP, with retries and backoff; failures are kept, never dropped.

One email per transaction: the row is locked (SKIP LOCKED: replicas never send it twice), sent, marked and
committed before the next one, so a crash re-sends at most the one email in flight, and that with the same
``Message-ID`` (derived from the event id) so that mail systems can recognise the duplicate.

The SMTP connection is kept open between emails (connect, EHLO, STARTTLS and AUTH once, not per email) and
closed after ``SMTP_IDLE_SECONDS`` without a send, on any error and when the mailer stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parseaddr

import aiosmtplib
import sqlalchemy as sa
from emporium_common.events import tracing_active
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import NotificationsSettings
from .consumer import prune_processed_events
from .models import Notification

log = logging.getLogger("emporium.notifications.mailer")

EMAILS = Counter("emporium_notifications_emails_total", "Email send attempts by outcome", ["outcome"])
PENDING = Gauge("emporium_notifications_pending", "Notifications waiting to be (re)sent")

_T = Notification.__table__  # type: ignore[attr-defined]
_TRACER = trace.get_tracer("emporium.notifications.mailer")


def build_message(settings: NotificationsSettings, row: sa.Row) -> EmailMessage:
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = row.recipient_email
    message["Subject"] = row.subject
    message["Message-ID"] = message_id(settings, row.event_id)
    message.set_content(row.text_body)
    message.add_alternative(row.body, subtype="html")
    return message


def message_id(settings: NotificationsSettings, event_id: object) -> str:
    """The same for every (re)send of one notification (one notification per event)."""
    domain = parseaddr(settings.smtp_from)[1].rpartition("@")[2] or "emporium.local"
    return f"<notification-{event_id}@{domain}>"


class Mailer:
    def __init__(self, engine: AsyncEngine, settings: NotificationsSettings, *, batch_size: int = 20) -> None:
        self.engine, self.settings, self.batch_size = engine, settings, batch_size
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._traces: dict[uuid.UUID, otel_context.Context] = {}
        self._smtp: aiosmtplib.SMTP | None = None
        self._smtp_used = 0.0

    def kick(self, event_id: uuid.UUID | None = None) -> None:
        """Wake the loop; with the id of the event just stored, its email's send span joins the trace
        being handled now (the consumer's), so one trace runs from the order to the email."""
        if event_id is not None:
            current = otel_context.get_current()
            if trace.get_current_span(current).get_span_context().is_valid:
                self._traces[event_id] = current
                while len(self._traces) > 1000:  # bounded: emails that never go out do not pile up
                    self._traces.pop(next(iter(self._traces)))
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def send(self, message: EmailMessage) -> None:
        """Send on the kept-open connection. A reused connection the server has meanwhile closed is replaced
        once at once (nothing was accepted on it); any other failure closes it and raises."""
        loop = asyncio.get_running_loop()
        reused = self._smtp is not None and loop.time() - self._smtp_used < self.settings.smtp_idle_seconds
        if not reused:
            await self.close_smtp()
        for attempt in (1, 2):
            if self._smtp is None:
                self._smtp = await self._connect()
            try:
                await self._smtp.send_message(message)
            except aiosmtplib.SMTPServerDisconnected:
                self._drop_smtp()
                if attempt == 2 or not reused:
                    raise
                continue
            except BaseException:
                self._drop_smtp()
                raise
            self._smtp_used = loop.time()
            return

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username,
            password=s.smtp_password,
            start_tls=s.smtp_starttls,
            timeout=s.smtp_timeout_seconds,
        )
        await smtp.connect()
        return smtp

    def _drop_smtp(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    async def close_smtp(self) -> None:
        """QUIT and close the kept connection (idle, or the mailer stops)."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await asyncio.wait_for(smtp.quit(), timeout=2)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()

    def _send_span(self, row: sa.Row) -> contextlib.AbstractContextManager[object]:
        """The email's send span, in the trace of the event that stored it (a no-op with tracing off)."""
        trace_context = self._traces.pop(row.event_id, None)
        if not tracing_active():
            return contextlib.nullcontext()
        return _TRACER.start_as_current_span(
            "smtp send",
            context=trace_context,
            kind=trace.SpanKind.CLIENT,
            attributes={"emporium.notification.id": row.id, "emporium.notification.type": row.type},
        )

    def _retry_delay(self, attempts: int) -> timedelta:
        return timedelta(
            seconds=min(3600.0, self.settings.mail_retry_base_seconds * 2 ** max(0, attempts - 1))
        )

    async def deliver_due(self, only_id: int | None = None) -> int:
        """Send up to ``batch_size`` due pending notifications, each in its own transaction."""
        done = 0
        for _ in range(1 if only_id is not None else self.batch_size):
            sent = await self._deliver_one(only_id)
            if sent is None:
                break
            done += sent
        return done

    async def _deliver_one(self, only_id: int | None) -> int | None:
        """Lock, send and mark one due notification; None when nothing is due."""
        async with self.engine.begin() as conn:
            query = (
                sa.select(_T)
                .where(_T.c.status == "pending")
                .order_by(_T.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if only_id is not None:
                query = query.where(_T.c.id == only_id)
            else:
                query = query.where(
                    sa.or_(_T.c.next_attempt_at.is_(None), _T.c.next_attempt_at <= sa.func.now())
                )
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            attempts = row.attempts + 1
            try:
                with self._send_span(row):
                    await self.send(build_message(self.settings, row))
                    log.info("email sent", extra={"notification_id": row.id, "event_id": str(row.event_id)})
            except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
                final = attempts >= self.settings.mail_max_attempts or isinstance(exc, ValueError)
                EMAILS.labels("failed" if final else "retry").inc()
                log.warning("email %s failed (attempt %d): %r", row.id, attempts, exc)
                await conn.execute(
                    sa.update(_T)
                    .where(_T.c.id == row.id)
                    .values(
                        attempts=attempts,
                        status="failed" if final else "pending",
                        error_message=repr(exc)[:1000],
                        next_attempt_at=datetime.now(UTC) + self._retry_delay(attempts),
                    )
                )
                return 0
            EMAILS.labels("sent").inc()
            await conn.execute(
                sa.update(_T)
                .where(_T.c.id == row.id)
                .values(attempts=attempts, status="sent", error_message=None, sent_at=sa.func.now())
            )
            return 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_prune = -3600.0
        last_gauge = -5.0
        try:
            while not self._stop.is_set():
                try:
                    if loop.time() - last_prune >= 3600:
                        last_prune = loop.time()
                        pruned = await prune_processed_events(
                            self.engine, self.settings.processed_events_retention_seconds
                        )
                        if pruned:
                            log.info("pruned %d processed event ids", pruned)
                    await self.deliver_due()
                    if loop.time() - last_gauge >= 5:  # the gauge's count(*), not once per email
                        last_gauge = loop.time()
                        await self.refresh_gauge()
                    idle = loop.time() - self._smtp_used
                    if self._smtp is not None and idle >= self.settings.smtp_idle_seconds:
                        await self.close_smtp()
                except Exception as exc:
                    log.warning("mailer loop failed: %r", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                self._wake.clear()
        finally:
            await self.close_smtp()

    async def refresh_gauge(self) -> None:
        async with self.engine.connect() as conn:
            PENDING.set(
                (await conn.execute(sa.select(sa.func.count()).where(_T.c.status == "pending"))).scalar() or 0
            )
