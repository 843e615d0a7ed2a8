"""Passwords (bcrypt) and tokens (short-lived signed JWT access tokens, opaque rotating refresh tokens)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import bcrypt
import jwt

from .config import UsersSettings
from .keys import KeyRing
from .models import PASSWORD_MAX_BYTES, User

BCRYPT_ROUNDS = 12


def hash_password(password: str) -> str:
    data = password.encode("utf-8")
    if len(data) > PASSWORD_MAX_BYTES:  # validated at the API already; bcrypt 5 would raise anyway
        raise ValueError("password longer than 72 bytes")
    return bcrypt.hashpw(data, bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


# Compared against when the account does not exist, so a login takes as long either way.
_DUMMY_HASH = bcrypt.hashpw(b"not-a-real-password", bcrypt.gensalt(BCRYPT_ROUNDS))


def verify_password(password: str, hashed: str | None) -> bool:
    try:
        data = password.encode("utf-8")
    except UnicodeEncodeError:
        data = b""
    if hashed is None or not data or len(data) > PASSWORD_MAX_BYTES or b"\x00" in data:
        bcrypt.checkpw(b"timing", _DUMMY_HASH)
        return False
    return bcrypt.checkpw(data, hashed.encode())


def create_access_token(user: User, keys: KeyRing, settings: UsersSettings) -> tuple[str, int]:
    """A signed access token and its lifetime in seconds."""
    key = keys.current
    now = datetime.now(UTC)
    lifetime = settings.access_token_minutes * 60
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": str(user.id),
        "iat": now,
        "nbf": now,
        "exp": now + timedelta(seconds=lifetime),
        "jti": uuid.uuid4().hex,
        "email": user.email,
        "roles": user.roles,
    }
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid}), lifetime


def new_refresh_token() -> tuple[str, str]:
    """An opaque refresh token (given to the client once) and the hash we store."""
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
