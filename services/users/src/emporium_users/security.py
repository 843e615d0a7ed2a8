"""Passwords (bcrypt) and tokens (short-lived signed JWT access tokens, opaque rotating refresh tokens)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import bcrypt
import jwt
from emporium_common import AppError

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


class PasswordHashing:
    """bcrypt off the event loop on a bounded number of threads, with a bounded queue.

    Without a bound, a burst of logins (or a guesser) starts one bcrypt per request and every request
    slows down together; with it, at most ``workers`` run at once and the rest wait their turn, up to
    ``max_waiting``; beyond that the caller gets 503 + Retry-After straight away.
    """

    def __init__(self, workers: int = 2, max_waiting: int = 64) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self.configure(workers, max_waiting)
        self.in_flight = 0  # only touched on the event loop thread

    def configure(self, workers: int, max_waiting: int) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self.workers, self.max_waiting = workers, max_waiting
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt")

    async def _run(self, fn, *args):
        if self.in_flight >= self.workers + self.max_waiting:
            busy = "Too many sign-ins in progress, retry shortly"
            raise AppError(503, busy, "service_unavailable", {"Retry-After": "1"})
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.in_flight -= 1

    async def hash(self, password: str) -> str:
        return await self._run(hash_password, password)

    async def verify(self, password: str, hashed: str | None) -> bool:
        return await self._run(verify_password, password, hashed)


# One per process: build_app sizes it from the settings.
hashing = PasswordHashing()


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
