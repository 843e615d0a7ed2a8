from __future__ import annotations

from emporium_common.config import InternalTokenSettings
from pydantic import Field


class OrdersSettings(InternalTokenSettings):
    service_name: str = "orders"
    # The products service (stock reservations over its /internal/ API).
    products_url: str = "http://products:8000"
    products_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # The outbox relay runs inside the service (one per replica; SKIP LOCKED makes that safe).
    outbox_relay: bool = True
    outbox_poll_seconds: float = Field(default=0.5, gt=0, le=60)
    # Orphaned reservations (no order after the grace period) are released; 0 disables the reaper.
    reservation_reaper_seconds: float = Field(default=60, ge=0, le=3600)
    reservation_grace_seconds: int = Field(default=300, ge=30, le=86400)
