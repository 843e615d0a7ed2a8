"""Queries of the notifications API (the routes hold no SQL)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from emporium_common import AppError, Principal
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import Notification


async def list_notifications(
    session: AsyncSession,
    principal: Principal,
    *,
    recipient: str | None,
    status: str | None,
    order_id: int | None,
    page: int,
    page_size: int,
) -> tuple[list[Notification], int]:
    """The caller's own notifications (admins: everyone's, optionally one recipient's), newest first."""
    conditions: list[Any] = []
    if principal.has_role("admin"):
        if recipient:
            conditions.append(col(Notification.recipient_email) == recipient.strip().lower())
    else:
        if recipient:
            raise AppError(403, "Only admins may filter by recipient", "forbidden")
        conditions.append(col(Notification.user_id) == principal.sub)
    if status:
        conditions.append(col(Notification.status) == status)
    if order_id:
        conditions.append(col(Notification.order_id) == order_id)
    total = (await session.exec(select(sa.func.count()).select_from(Notification).where(*conditions))).one()
    rows = await session.exec(
        select(Notification)
        .where(*conditions)
        .order_by(col(Notification.id).desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    return list(rows.all()), int(total)


async def get_notification(session: AsyncSession, principal: Principal, notification_id: int) -> Notification:
    """404 for a missing notification and for another user's."""
    notification = await session.get(Notification, notification_id)
    if notification is None or (not principal.has_role("admin") and notification.user_id != principal.sub):
        raise AppError(404, "Notification not found")
    return notification


async def mark_for_retry(session: AsyncSession, principal: Principal, notification_id: int) -> Notification:
    """A failed notification back to pending (attempts reset); 400 for any other status."""
    notification = await get_notification(session, principal, notification_id)
    if notification.status != "failed":
        raise AppError(400, "Only failed notifications can be retried")
    if not notification.recipient_email:
        raise AppError(400, "Notification has no recipient address")
    notification.status, notification.attempts, notification.next_attempt_at = "pending", 0, None
    session.add(notification)
    await session.commit()
    return notification
