"""One settings class for every service (services subclass it for their extras).

Values come from the environment (names in docs/contracts.md). ``ENVIRONMENT=production`` refuses weak
configuration instead of starting with it.
"""

from __future__ import annotations

from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Passwords that only ever belong in a developer's laptop.
WEAK_SECRETS = frozenset({"", "postgres", "password", "changethis", "changeme", "secret", "guest", "admin"})


def to_asyncpg_url(url: str) -> str:
    """``postgresql://`` (what the operator's Secret holds) -> ``postgresql+asyncpg://`` for SQLAlchemy."""
    for prefix in ("postgresql+asyncpg://", "postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must start with postgresql://")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")
    # Services that check tokens against the users service's key set need JWKS_URL in production (without
    # it every authenticated route would fail); the users service verifies its own tokens and says False.
    requires_jwks_url: ClassVar[bool] = True

    service_name: str = "emporium"
    environment: Literal["local", "development", "production"] = "local"
    # All interfaces in a container; the local platform (make up) binds services to 127.0.0.1.
    host: str = "0.0.0.0"  # noqa: S104
    port: int = Field(default=8000, ge=1, le=65535)
    # How long an idle keep-alive connection stays open. Longer than every client's idle timeout (Envoy's is
    # 60 s by the chart's DestinationRules, httpx's 5 s): a server that closes first races the client reusing
    # the connection, and the request lost in that race comes back as a 503 (uvicorn's default is 5 s).
    keep_alive_seconds: int = Field(default=75, ge=1, le=3600)
    database_url: str = "postgresql://postgres:postgres@localhost:5432/emporium"
    database_pool_size: int = Field(default=10, ge=1)
    amqp_url: str | None = None
    jwt_issuer: str = "https://emporium.local/users"
    jwt_audience: str = "emporium"
    jwks_url: str | None = None
    jwks_cache_seconds: int = Field(default=300, ge=1)
    # Largest request body a route takes unless create_app(body_limits=...) says otherwise (413 beyond).
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    otel_traces_exporter: Literal["none", "console", "otlp"] = "none"
    otel_exporter_otlp_endpoint: str | None = None
    # Development only (skaffold dev on kind, k8s/values/dev.yaml): `serve` runs uvicorn with reload,
    # watching the .py files under this folder (where skaffold syncs saved files). Refused in production.
    reload_dir: str | None = None

    @field_validator("database_url")
    @classmethod
    def _asyncpg_driver(cls, value: str) -> str:
        return to_asyncpg_url(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper() if isinstance(value, str) else value

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    def production_problems(self) -> list[str]:
        """A service's own production checks (override and extend); each string names one problem."""
        return []

    @model_validator(mode="after")
    def _refuse_weak_production_config(self) -> Settings:
        if not self.is_production:
            return self
        problems = []
        db = urlsplit(self.database_url)
        if (db.password or "") in WEAK_SECRETS:
            problems.append("DATABASE_URL has an empty or default password")
        if db.hostname in {"localhost", "127.0.0.1"}:
            problems.append("DATABASE_URL points at localhost")
        if self.amqp_url:
            amqp = urlsplit(self.amqp_url)
            if (amqp.password or "") in WEAK_SECRETS:
                problems.append("AMQP_URL has an empty or default password")
        if self.requires_jwks_url and not self.jwks_url:
            problems.append("JWKS_URL is not set (tokens could not be verified)")
        elif self.jwks_url and urlsplit(self.jwks_url).scheme not in {"http", "https"}:
            problems.append("JWKS_URL must be an http(s) URL")
        problems.extend(self.production_problems())
        if self.log_level == "DEBUG":
            problems.append("LOG_LEVEL=DEBUG logs request details in production")
        if self.reload_dir:
            problems.append("RELOAD_DIR (reloading on source changes) is for development only")
        if self.otel_traces_exporter == "otlp" and not self.otel_exporter_otlp_endpoint:
            problems.append("OTEL_TRACES_EXPORTER=otlp needs OTEL_EXPORTER_OTLP_ENDPOINT")
        if problems:
            raise ValueError("refusing weak production configuration: " + "; ".join(problems))
        return self


class InternalTokenSettings(Settings):
    """Settings of the services on either side of products' ``/internal/`` stock API (products, orders)."""

    # Shared secret orders sends and products checks as X-Internal-Token (the same value in both).
    # Unset: products refuses every internal call (403); production refuses to start without it.
    internal_token: str | None = Field(default=None, min_length=16)

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if not self.internal_token:
            problems.append("INTERNAL_TOKEN is not set")
        return problems
