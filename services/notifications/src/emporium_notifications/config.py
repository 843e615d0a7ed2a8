from __future__ import annotations

from emporium_common import Settings
from pydantic import Field


class NotificationsSettings(Settings):
    service_name: str = "notifications"
    smtp_host: str = "localhost"
    smtp_port: int = Field(default=1025, ge=1, le=65535)
    smtp_from: str = "Emporium <noreply@emporium.local>"
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # The SMTP connection is kept open between emails and closed after this long without one.
    smtp_idle_seconds: float = Field(default=30.0, ge=0, le=300)
    # Events: the queue from charts/notifications/files/rabbit-topology.yaml; attempts before dead-lettering.
    events_queue: str = "notifications.events"
    event_max_attempts: int = Field(default=8, ge=1, le=50)
    event_retry_base_seconds: float = Field(default=1.0, gt=0, le=60)
    # Email: attempts (with exponential backoff from mail_retry_base_seconds) before a notification is failed.
    mail_max_attempts: int = Field(default=5, ge=1, le=50)
    mail_retry_base_seconds: float = Field(default=2.0, gt=0, le=3600)
    # Event ids are remembered (duplicates ignored) this long, far beyond any redelivery; then pruned.
    processed_events_retention_seconds: float = Field(default=7 * 24 * 3600, ge=3600)
    # Failed handling is retried through this exchange (a delay queue), without holding the consumer;
    # empty: retry in place (the message is held while waiting).
    events_retry_exchange: str = "notifications.retry"
    # Open notification websockets per user and replica (a new one beyond is closed with 4429).
    websocket_max_per_user: int = Field(default=5, ge=1, le=100)
    # Background work (consumer, mailer, websocket fan-out listener) runs in the API process.
    background_workers: bool = True

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if (self.smtp_username or self.smtp_password) and not self.smtp_starttls:
            # The password would cross the network in clear text (AUTH PLAIN/LOGIN is base64).
            problems.append("SMTP credentials without SMTP_STARTTLS=true")
        return problems
