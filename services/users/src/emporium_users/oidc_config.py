"""Configuration of the OpenID Connect providers people may sign in with.

``OIDC_PROVIDERS`` is a JSON list, one object per provider (keys in snake_case or camelCase)::

    [{"name": "google", "display_name": "Google", "issuer": "https://accounts.google.com",
      "client_id": "1234-abc.apps.googleusercontent.com", "scopes": ["openid", "email", "profile"]}]

The client secret is not part of that list: it is the file ``<OIDC_CLIENT_SECRETS_DIR>/<name>`` (the chart
mounts a Secret there, one key per provider) or the variable ``OIDC_CLIENT_SECRET_<NAME>`` (the name
upper-cased, ``-`` as ``_``). ``client_secret`` in the list is accepted for local runs. A provider without a
secret is a public client (PKCE only).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic.alias_generators import to_camel


class OIDCProvider(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=False)

    # In paths (/auth/oidc/<name>/start) and in the chart's Secret key names.
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    display_name: str = Field(min_length=1, max_length=64)
    # Exactly as the provider's discovery document states it (compared character for character).
    issuer: str = Field(max_length=255)
    client_id: str = Field(min_length=1, max_length=255)
    client_secret: SecretStr | None = None
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile"])
    # Sign-in may attach this provider's identity to an existing account with the same email without the
    # account's password, if (and only if) the provider asserts email_verified. Only for providers that
    # really verify emails (Google does; a self-service IdP may not).
    auto_link_verified_email: bool = False

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
            raise ValueError("issuer must be an http(s) URL without query or fragment")
        return value

    @field_validator("scopes")
    @classmethod
    def _openid_scope(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError("scopes must include openid")
        if any(not re.match(r"^[\x21\x23-\x5b\x5d-\x7e]+$", s) for s in value):
            raise ValueError("invalid scope")
        return value

    @property
    def secret_env_name(self) -> str:
        return "OIDC_CLIENT_SECRET_" + self.name.upper().replace("-", "_")

    def load_secret(self, secrets_dir: Path | None = None) -> None:
        if self.client_secret is not None:
            return
        path = secrets_dir / self.name if secrets_dir else None
        if path is not None and path.is_file():
            self.client_secret = SecretStr(path.read_text().strip())
        elif os.environ.get(self.secret_env_name):
            self.client_secret = SecretStr(os.environ[self.secret_env_name])
