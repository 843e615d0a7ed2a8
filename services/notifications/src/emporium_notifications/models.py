"""Tables (SQLModel) and API schemas of the notifications service."""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from emporium_common.domain import timestamp_column
from pydantic import BaseModel, ConfigDict
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel


def _ts(nullable: bool = False) -> sa.Column:
    return timestamp_column(nullable=nullable)


class ProcessedEvent(SQLModel, table=True):
    """Every event id handled once (idempotent consumer), whether or not it produced a notification."""

    __tablename__ = "processed_events"

    event_id: uuid.UUID = SQLField(sa_column=sa.Column(sa.Uuid, primary_key=True))
    type: str = SQLField(sa_column=sa.Column(sa.String(100), nullable=False))
    processed_at: datetime | None = SQLField(default=None, sa_column=_ts())


class Notification(SQLModel, table=True):
    __tablename__ = "notifications"

    id: int | None = SQLField(default=None, primary_key=True)
    event_id: uuid.UUID = SQLField(sa_column=sa.Column(sa.Uuid, nullable=False, unique=True))
    type: str = SQLField(sa_column=sa.Column(sa.String(50), nullable=False))
    recipient_email: str = SQLField(sa_column=sa.Column(sa.String(255), nullable=False))
    subject: str = SQLField(sa_column=sa.Column(sa.String(255), nullable=False))
    body: str = SQLField(sa_column=sa.Column(sa.Text, nullable=False))
    text_body: str = SQLField(sa_column=sa.Column(sa.Text, nullable=False))
    order_id: int | None = SQLField(default=None, sa_column=sa.Column(sa.Integer))
    user_id: str | None = SQLField(default=None, sa_column=sa.Column(sa.String(64)))
    status: str = SQLField(sa_column=sa.Column(sa.String(20), nullable=False))
    attempts: int = SQLField(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    error_message: str | None = SQLField(default=None, sa_column=sa.Column(sa.Text))
    next_attempt_at: datetime | None = SQLField(default=None, sa_column=_ts(nullable=True))
    created_at: datetime | None = SQLField(default=None, sa_column=_ts())
    sent_at: datetime | None = SQLField(default=None, sa_column=_ts(nullable=True))


class NotificationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    event_id: uuid.UUID
    type: str
    recipient_email: str
    subject: str
    order_id: int | None
    user_id: str | None
    status: str
    attempts: int
    error_message: str | None
    created_at: datetime
    sent_at: datetime | None


class NotificationDetail(NotificationPublic):
    body: str


class NotificationList(BaseModel):
    notifications: list[NotificationPublic]
    total: int
