"""The users service's tables and API shapes (SQLModel class family per entity)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from emporium_common import db as _db  # noqa: F401 - sets the constraint naming convention first
from pydantic import AfterValidator, BeforeValidator, EmailStr
from sqlalchemy import CheckConstraint, Column, DateTime, ForeignKey, Index, String, UniqueConstraint, func
from sqlmodel import Field, SQLModel

PASSWORD_MAX_BYTES = 72  # bcrypt's limit: longer passwords are refused, never silently cut


class Role(StrEnum):
    customer = "customer"
    admin = "admin"


def _normalise_email(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _printable(value: str) -> str:
    # Postgres rejects NUL and lone surrogates cannot be encoded: refuse them here (422), not in the DB (500).
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode") from None
    return value


def _password(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode") from None
    if size > PASSWORD_MAX_BYTES:
        raise ValueError(f"must be at most {PASSWORD_MAX_BYTES} bytes in UTF-8")
    return value


Email = Annotated[EmailStr, BeforeValidator(_normalise_email)]
Username = Annotated[str, Field(min_length=3, max_length=50), AfterValidator(_printable)]
NewPassword = Annotated[str, Field(min_length=8), AfterValidator(_password)]


def _timestamp(**kwargs) -> Column:
    return Column(DateTime(timezone=True), nullable=False, server_default=func.now(), **kwargs)


class UserBase(SQLModel):
    email: Email = Field(max_length=255)
    username: Username


class UserCreate(UserBase):
    password: NewPassword


class User(UserBase, table=True):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("role IN ('customer', 'admin')", name="role"),)

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=255, sa_column_kwargs={"unique": True}, index=False)
    username: str = Field(max_length=50, sa_column_kwargs={"unique": True})
    # None for accounts made through an OpenID Connect provider: no password login until one is set.
    hashed_password: str | None = Field(default=None, max_length=255, nullable=True)
    is_active: bool = Field(default=True)
    role: Role = Field(default=Role.customer, sa_type=String(20))
    created_at: datetime | None = Field(default=None, sa_column=_timestamp())
    updated_at: datetime | None = Field(default=None, sa_column=_timestamp(onupdate=func.now()))

    @property
    def roles(self) -> list[str]:
        return [str(self.role)]


class UserPublic(SQLModel):
    id: int
    email: str
    username: str
    is_active: bool
    roles: list[str]
    created_at: datetime
    updated_at: datetime


class RefreshToken(SQLModel, table=True):
    """One refresh token. Tokens from one login form a family; each refresh spends one and issues the next.

    Only the SHA-256 of the token is stored (it is a 256-bit random value, so a fast hash is enough).
    """

    __tablename__ = "refresh_tokens"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: int = Field(
        sa_column=Column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    family_id: uuid.UUID = Field(index=True)
    token_hash: str = Field(max_length=64, sa_column_kwargs={"unique": True})
    created_at: datetime | None = Field(default=None, sa_column=_timestamp())
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    used_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class LoginAttempt(SQLModel, table=True):
    """Recent password checks, for throttling. Recorded as failed before the check (so a burst cannot
    pass the count before its attempts are recorded), marked succeeded when the password was right."""

    __tablename__ = "login_attempts"
    __table_args__ = (
        Index("ix_login_attempts_client_address_attempted_at", "client_address", "attempted_at"),
        Index("ix_login_attempts_email_attempted_at", "email", "attempted_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=255, index=True)
    client_address: str = Field(max_length=64, index=True)
    succeeded: bool
    attempted_at: datetime | None = Field(default=None, sa_column=_timestamp(index=True))


class RegistrationAttempt(SQLModel, table=True):
    """Recent registrations per client address, for rate limiting."""

    __tablename__ = "registration_attempts"
    __table_args__ = (
        Index("ix_registration_attempts_client_address_attempted_at", "client_address", "attempted_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    client_address: str = Field(max_length=64)
    attempted_at: datetime | None = Field(default=None, sa_column=_timestamp())


class ExternalIdentity(SQLModel, table=True):
    """An account at an OpenID Connect provider, keyed by (issuer, sub) as the spec says (never by email)."""

    __tablename__ = "external_identities"
    __table_args__ = (UniqueConstraint("issuer", "subject"),)

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(
        sa_column=Column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    provider: str = Field(max_length=32)
    issuer: str = Field(max_length=255)
    subject: str = Field(max_length=255)
    email: str | None = Field(default=None, max_length=255)
    created_at: datetime | None = Field(default=None, sa_column=_timestamp())
    last_login_at: datetime | None = Field(default=None, sa_column=_timestamp())


class OIDCLoginState(SQLModel, table=True):
    """One started sign-in: what the callback needs to check and finish it. Used once, then deleted."""

    __tablename__ = "oidc_login_states"

    state_hash: str = Field(max_length=64, primary_key=True)
    provider: str = Field(max_length=32)
    nonce: str = Field(max_length=128)
    code_verifier: str = Field(max_length=128)
    # SHA-256 of the random value in the browser's cookie: the callback must come from the same browser.
    browser_hash: str = Field(max_length=64)
    redirect_uri: str = Field(max_length=1024)
    return_to: str | None = Field(default=None, max_length=2048)
    # Set when a signed-in user links this provider to their account.
    link_user_id: int | None = Field(
        default=None, sa_column=Column(ForeignKey("users.id", ondelete="CASCADE"), nullable=True)
    )
    created_at: datetime | None = Field(default=None, sa_column=_timestamp())
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))


class OIDCLoginCode(SQLModel, table=True):
    """The one-time code a finished sign-in ends with; the client exchanges it (POST) for tokens."""

    __tablename__ = "oidc_login_codes"

    code_hash: str = Field(max_length=64, primary_key=True)
    user_id: int = Field(sa_column=Column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False))
    created_at: datetime | None = Field(default=None, sa_column=_timestamp())
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))


# API shapes


class LoginRequest(SQLModel):
    email: Email
    password: str = Field(min_length=1, max_length=1024)


class RefreshRequest(SQLModel):
    refresh_token: str = Field(min_length=1, max_length=512)


class Token(SQLModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int
    refresh_token: str


class OIDCProviderPublic(SQLModel):
    name: str
    display_name: str
    start_url: str


class OIDCCodeExchange(SQLModel):
    code: str = Field(min_length=1, max_length=128)


class OIDCLinkRequest(SQLModel):
    return_to: str | None = Field(default=None, max_length=2048)


class OIDCAuthorization(SQLModel):
    authorization_url: str


class OIDCLoginCodeResponse(SQLModel):
    code: str
    expires_in: int
