"""JWT verification against a JWKS, for services that check tokens themselves (defence in depth behind
the Istio gateway, which checks the same tokens).

Tokens are issued by the users service: ES256 or RS256, ``kid`` in the header, claims ``iss``, ``aud``,
``sub``, ``exp``, ``iat``, ``nbf``, ``jti``, ``email``, ``roles``.

Usage in a route::

    @router.get("/orders")
    async def list_orders(principal: CurrentPrincipal, session: SessionDep): ...

    @router.post("/products", dependencies=[Depends(require_role("admin"))])
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import AppError

log = logging.getLogger("emporium.auth")

# Asymmetric only: "none" and HMAC (where a public key could be abused as the secret) are never accepted.
ALLOWED_ALGORITHMS = ("ES256", "RS256")
REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp", "iat", "nbf", "jti"]
LEEWAY_SECONDS = 10  # clock skew between pods


class InvalidToken(Exception):
    """The token is not acceptable; the message says why (for logs, never for clients)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, as stated by a verified token."""

    sub: str
    email: str | None = None
    roles: frozenset[str] = frozenset()
    claims: dict[str, Any] = field(default_factory=dict, compare=False)

    def has_role(self, role: str) -> bool:
        return role in self.roles


class KeySource:
    """Where verification keys come from. ``get_key`` returns None for an unknown kid."""

    async def get_key(self, kid: str) -> jwt.PyJWK | None:  # pragma: no cover - interface
        raise NotImplementedError


class StaticKeySet(KeySource):
    """A key set known in-process (the users service verifying its own tokens; tests)."""

    def __init__(self, jwks: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        self._jwks = jwks

    async def get_key(self, kid: str) -> jwt.PyJWK | None:
        jwks = self._jwks() if callable(self._jwks) else self._jwks
        return _find_key(jwks, kid)


class KeysUnavailable(Exception):
    """No key set could be had (a cold start with the issuer down): the caller should retry, not re-login."""


class RemoteKeySet(KeySource):
    """A JWKS fetched over HTTP: stale-while-revalidate, one fetch at a time, no lock held across it.

    - Fresh (younger than ``cache_seconds``): served from memory.
    - Stale: still served at once, while one background fetch refreshes it; a failed refresh keeps the
      cached set (retried after ``min_refresh_seconds``) for up to ``max_stale_seconds``.
    - An unknown kid waits for one refetch (a key was just published), at most every
      ``min_refresh_seconds``, so made-up kids cannot turn this service into a load generator.
    - Nothing cached yet (cold start): requests wait for the one shared fetch (``timeout``); if it fails,
      ``KeysUnavailable`` (the API answers 503, not 401: the token may well be valid).
    Concurrent callers share the fetch in flight (a task, not a lock): a slow issuer slows only the
    requests that cannot be answered without it.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float = 300,
        min_refresh_seconds: float = 30,
        max_stale_seconds: float = 24 * 3600,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, self.cache_seconds, self.min_refresh_seconds = url, cache_seconds, min_refresh_seconds
        self.max_stale_seconds = max_stale_seconds
        self._timeout, self._transport = timeout, transport
        self._jwks: dict[str, Any] | None = None
        self._fetched_at = float("-inf")  # when the cached set was fetched
        self._attempted_at = float("-inf")  # when a fetch last started (successful or not)
        self._inflight: asyncio.Task[None] | None = None

    async def _fetch(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout, transport=self._transport) as client:
            response = await client.get(self.url)
            response.raise_for_status()
            data = response.json()
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError("JWKS document has no 'keys' list")
        self._jwks, self._fetched_at = data, time.monotonic()

    def _refresh(self) -> asyncio.Task[None]:
        """The fetch in flight, or a new one (one at a time per key set)."""
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._attempted_at = time.monotonic()
            task = asyncio.get_running_loop().create_task(self._fetch(), name="jwks-refresh")
            task.add_done_callback(_log_refresh_failure)
            self._inflight = task
        return task

    async def _wait_for_refresh(self) -> None:
        # shield: a caller giving up (client gone, timeout) does not cancel the fetch others wait on.
        try:
            await asyncio.wait_for(asyncio.shield(self._refresh()), self._timeout + 1)
        except Exception as exc:
            log.warning("JWKS fetch from %s failed: %r", self.url, exc)

    def _usable(self, now: float) -> bool:
        return self._jwks is not None and now - self._fetched_at <= self.max_stale_seconds

    async def get_key(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        # Without keys every request fails: retry the issuer soon (every 2 s at most), not after 30 s.
        interval = self.min_refresh_seconds if self._usable(now) else min(2.0, self.min_refresh_seconds)
        may_refetch = now - self._attempted_at > interval
        if not self._usable(now):
            if may_refetch or (self._inflight is not None and not self._inflight.done()):
                await self._wait_for_refresh()
            if not self._usable(time.monotonic()):
                raise KeysUnavailable(f"no key set from {self.url}")
        elif now - self._fetched_at > self.cache_seconds and may_refetch:
            self._refresh()  # stale: answer with what we have, refresh in the background
        key = _find_key(self._jwks or {}, kid)
        if key is None and may_refetch:
            await self._wait_for_refresh()  # perhaps a key published since our last fetch
            key = _find_key(self._jwks or {}, kid)
        return key


def _log_refresh_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("JWKS refresh failed, keeping the cached key set: %r", task.exception())


def _find_key(jwks: dict[str, Any], kid: str) -> jwt.PyJWK | None:
    for entry in jwks.get("keys", []):
        if entry.get("kid") == kid and entry.get("use", "sig") == "sig":
            return _parse_key(json.dumps(entry, sort_keys=True))
    return None


@functools.lru_cache(maxsize=64)
def _parse_key(entry: str) -> jwt.PyJWK | None:
    """A JWK parsed once, not on every request (loading an EC key costs more than verifying a token)."""
    try:
        return jwt.PyJWK(json.loads(entry))
    except jwt.PyJWTError:
        log.warning("unusable key %s in JWKS", json.loads(entry).get("kid"))
        return None


class TokenVerifier:
    """Verifies access tokens. A token verified once is remembered (bounded LRU) with the key object that
    verified it: a client's next requests skip the signature check (the costliest part of a request that
    reads one row), while expiry is checked every time and a key gone from the key set ends them at once.
    """

    CACHE_SIZE = 4096

    def __init__(
        self, keys: KeySource, *, issuer: str, audience: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.keys, self.issuer, self.audience, self.clock = keys, issuer, audience, clock
        self._verified: OrderedDict[str, tuple[jwt.PyJWK, Principal]] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        """Return the principal of a valid token; raise InvalidToken otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed token: {exc}") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALLOWED_ALGORITHMS:
            raise InvalidToken(f"algorithm {alg!r} not allowed")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("token has no kid")
        key = await self.keys.get_key(kid)  # KeysUnavailable propagates: not the token's fault
        if key is None:
            raise InvalidToken(f"unknown kid {kid!r}")
        cached = self._verified.get(token)
        if cached is not None and cached[0] is key:
            if self.clock() >= cached[1].claims["exp"] + LEEWAY_SECONDS:
                del self._verified[token]
                raise InvalidToken("Signature has expired")
            self._verified.move_to_end(token)
            return cached[1]
        principal = self._verify_signed(token, key, alg)
        self._verified[token] = (key, principal)
        if len(self._verified) > self.CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _verify_signed(self, token: str, key: jwt.PyJWK, alg: str) -> Principal:
        # The key's own algorithm wins over the header's: a key is used with exactly one algorithm.
        if key.algorithm_name != alg:
            raise InvalidToken(f"algorithm {alg!r} does not match key {key.key_id!r}")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        roles = claims.get("roles") or []
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise InvalidToken("roles claim must be a list of strings")
        if not isinstance(claims["sub"], str):
            raise InvalidToken("sub must be a string")
        return Principal(sub=claims["sub"], email=claims.get("email"), roles=frozenset(roles), claims=claims)


_bearer = HTTPBearer(auto_error=False, description="Access token from POST /users/login")

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


def unauthorized(detail: str = "Could not validate credentials") -> AppError:
    return AppError(401, detail, "unauthorized", UNAUTHORIZED_HEADERS)


async def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """FastAPI dependency: the verified caller, or 401. Uses ``app.state.token_verifier``."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise unauthorized("Not authenticated")
    verifier: TokenVerifier | None = getattr(request.app.state, "token_verifier", None)
    if verifier is None:
        raise RuntimeError("create_app(token_verifier=...) is needed for authenticated routes")
    try:
        principal = await verifier.verify(credentials.credentials)
    except InvalidToken as exc:
        log.info("token rejected: %s", exc)
        raise unauthorized() from None
    except KeysUnavailable as exc:
        log.warning("cannot verify tokens: %s", exc)
        raise keys_unavailable() from None
    request.state.principal = principal
    return principal


def keys_unavailable() -> AppError:
    """503: the token may be valid, but the issuer's keys cannot be had right now (retry, do not re-login)."""
    return AppError(503, "Cannot verify tokens right now", "service_unavailable", {"Retry-After": "5"})


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require_role(*roles: str) -> Callable[..., Any]:
    """Dependency that allows callers holding any of ``roles`` (401 without a token, 403 without the role)."""
    wanted = frozenset(roles)

    async def dependency(principal: CurrentPrincipal) -> Principal:
        if not (principal.roles & wanted):
            raise AppError(403, "Not enough permissions", "forbidden")
        return principal

    return dependency


def verifier_from_settings(settings: Any) -> TokenVerifier | None:
    """A verifier fetching ``settings.jwks_url``, or None when no JWKS_URL is configured."""
    if not settings.jwks_url:
        return None
    keys = RemoteKeySet(settings.jwks_url, cache_seconds=settings.jwks_cache_seconds)
    return TokenVerifier(keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
