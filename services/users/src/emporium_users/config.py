"""Users service settings: the common ones plus keys, token lifetimes, admin bootstrap and login limits."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from emporium_common import Settings
from pydantic import Field, model_validator

from .models import UserCreate
from .oidc_config import OIDCProvider


class UsersSettings(Settings):
    service_name: str = "users"
    requires_jwks_url: ClassVar[bool] = False  # it verifies its own tokens with its own keys
    # PEM private keys: current.pem signs; next.pem and previous.pem are only published (rotation).
    jwt_keys_dir: Path = Path(".local/jwt-keys")
    access_token_minutes: int = Field(default=15, ge=1, le=60)
    refresh_token_days: int = Field(default=14, ge=1, le=90)
    # Bootstrap the first admin at startup (also: `python -m emporium_users create-admin`).
    admin_email: str | None = None
    admin_username: str = "admin"
    admin_password: str | None = None
    # Login throttling counts failed password checks (never successes), each in a sliding window:
    # - per account and client address: the guesser at that address gets 429, the owner elsewhere does not;
    login_max_failures_per_account: int = Field(default=5, ge=1)
    login_account_window_seconds: int = Field(default=900, ge=1)
    # - per client address, whatever the accounts (one address trying many accounts): 429;
    login_max_failures_per_address: int = Field(default=30, ge=1)
    login_address_window_seconds: int = Field(default=300, ge=1)
    # - per account from all addresses (a guesser spreading over many addresses): no lockout, a delay before
    #   each password check of that account that doubles per failure beyond the threshold, up to the cap.
    login_slowdown_after_failures: int = Field(default=10, ge=1)
    login_slowdown_max_seconds: float = Field(default=4.0, ge=0, le=30)
    # Registrations per client address (all of them count) in a sliding window.
    register_max_per_address: int = Field(default=30, ge=1)
    register_window_seconds: int = Field(default=600, ge=1)
    # bcrypt (~0.25 s of CPU each) runs on at most this many threads; beyond `password_hash_max_waiting`
    # queued checks the service answers 503 + Retry-After at once instead of queueing without bound.
    password_hash_workers: int = Field(default=2, ge=1, le=64)
    password_hash_max_waiting: int = Field(default=64, ge=0)
    # How many reverse proxies (Istio ingress = 1) append to X-Forwarded-For in front of us; 0 = use the
    # socket peer. Trusting more hops than exist lets clients pick their own address.
    trusted_proxy_hops: int = Field(default=0, ge=0, le=5)

    # Sign-in with OpenID Connect providers (JSON list in OIDC_PROVIDERS; see oidc_config.py and README).
    oidc_providers: list[OIDCProvider] = Field(default_factory=list)
    # Public base URL of the edge (https://shop.example.com); redirect URI: <base>/auth/oidc/<name>/callback.
    # Empty: taken from the request (fine locally; behind a proxy set it).
    oidc_redirect_base_url: str | None = None
    # A Secret mounted as files: the client secret of provider <name> is the file <dir>/<name>.
    oidc_client_secrets_dir: Path | None = None
    # Absolute return_to URLs must start with one of these origins (relative paths are always allowed).
    oidc_allowed_return_origins: list[str] = Field(default_factory=list)
    # The browser-binding cookie is Secure (HTTPS only) unless this is false (plain-HTTP local runs).
    oidc_cookie_secure: bool = True
    oidc_login_timeout_seconds: int = Field(default=600, ge=60, le=3600)
    oidc_code_lifetime_seconds: int = Field(default=60, ge=10, le=600)

    @model_validator(mode="after")
    def _check_oidc(self) -> UsersSettings:
        names = [p.name for p in self.oidc_providers]
        if len(names) != len(set(names)):
            raise ValueError("OIDC_PROVIDERS: provider names must be unique")
        for provider in self.oidc_providers:
            provider.load_secret(self.oidc_client_secrets_dir)
        if self.is_production:
            for provider in self.oidc_providers:
                if not provider.issuer.startswith("https://"):
                    raise ValueError(
                        f"refusing weak production configuration: OIDC issuer of {provider.name} is not https"
                    )
            if self.oidc_providers and not self.oidc_cookie_secure:
                raise ValueError("refusing weak production configuration: OIDC_COOKIE_SECURE=false")
        return self

    @model_validator(mode="after")
    def _check_admin(self) -> UsersSettings:
        # A bad bootstrap admin fails at startup, loudly, with the same rules as registration.
        # (ADMIN_EMAIL alone is fine: `create-admin` reads it and asks for the password.)
        if self.admin_email and self.admin_password:
            UserCreate(email=self.admin_email, username=self.admin_username, password=self.admin_password)
        if self.is_production and self.admin_password is not None and len(self.admin_password) < 12:
            raise ValueError("refusing weak production configuration: ADMIN_PASSWORD shorter than 12")
        return self
