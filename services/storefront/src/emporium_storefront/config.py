"""Settings of the storefront (env names in the service README)."""

from __future__ import annotations

from emporium_common import Settings
from pydantic import Field, model_validator


class StorefrontSettings(Settings):
    service_name: str = "storefront"
    # The other services, over the cluster network (never through the public ingress).
    users_url: str = "http://users:8000"
    products_url: str = "http://products:8000"
    orders_url: str = "http://orders:8000"
    notifications_url: str = "http://notifications:8000"
    upstream_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Seals the session cookie (AES-256-GCM, key derived with SHA-256). Unset outside production: a
    # random key per process (sessions end when it restarts). Required, >= 32 characters, in production.
    session_key: str | None = None
    session_max_age_seconds: int = Field(default=14 * 24 * 3600, ge=60)
    # Secure cookies (HTTPS only): default on everywhere but ENVIRONMENT=local (plain http://127.0.0.1).
    cookie_secure: bool | None = None
    page_size: int = Field(default=12, ge=1, le=100)

    @property
    def secure_cookies(self) -> bool:
        return self.cookie_secure if self.cookie_secure is not None else self.environment != "local"

    @model_validator(mode="after")
    def _refuse_weak_production_config(self) -> StorefrontSettings:
        """Replaces the base check: no database or broker here, a session key and Secure cookies instead."""
        if not self.is_production:
            return self
        problems = []
        if len(self.session_key or "") < 32:
            problems.append("SESSION_KEY needs at least 32 characters")
        if self.cookie_secure is False:
            problems.append("COOKIE_SECURE=false sends the session over plain HTTP")
        if self.log_level == "DEBUG":
            problems.append("LOG_LEVEL=DEBUG logs request details in production")
        if self.otel_traces_exporter == "otlp" and not self.otel_exporter_otlp_endpoint:
            problems.append("OTEL_TRACES_EXPORTER=otlp needs OTEL_EXPORTER_OTLP_ENDPOINT")
        if problems:
            raise ValueError("refusing weak production configuration: " + "; ".join(problems))
        return self
