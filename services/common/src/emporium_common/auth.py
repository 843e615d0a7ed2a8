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
import logging
import time
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


class RemoteKeySet(KeySource):
    """A JWKS fetched over HTTP and cached for ``cache_seconds``.

    An unknown kid triggers one refetch (a new key was published), but at most every ``min_refresh_seconds``,
    so tokens with made-up kids cannot turn this service into a load generator against the issuer. When a
    refresh fails, the cached key set stays in use.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float = 300,
        min_refresh_seconds: float = 30,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, self.cache_seconds, self.min_refresh_seconds = url, cache_seconds, min_refresh_seconds
        self._timeout, self._transport = timeout, transport
        self._jwks: dict[str, Any] | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def _refresh(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout, transport=self._transport) as client:
            response = await client.get(self.url)
            response.raise_for_status()
            data = response.json()
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise InvalidToken("JWKS document has no 'keys' list")
        self._jwks, self._fetched_at = data, time.monotonic()

    async def get_key(self, kid: str) -> jwt.PyJWK | None:
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            stale = self._jwks is None or age > self.cache_seconds
            unknown_kid = self._jwks is not None and _find_key(self._jwks, kid) is None
            if stale or (unknown_kid and age > self.min_refresh_seconds):
                try:
                    await self._refresh()
                except (httpx.HTTPError, ValueError, InvalidToken) as exc:
                    if self._jwks is None:
                        raise
                    # The issuer is down: keep verifying with the keys we have (they were valid minutes
                    # ago) and try again after min_refresh_seconds rather than on every request.
                    log.warning("JWKS refresh failed, using the cached key set: %r", exc)
                    self._fetched_at = time.monotonic() - self.cache_seconds + self.min_refresh_seconds
            return _find_key(self._jwks or {}, kid)


def _find_key(jwks: dict[str, Any], kid: str) -> jwt.PyJWK | None:
    for entry in jwks.get("keys", []):
        if entry.get("kid") == kid and entry.get("use", "sig") == "sig":
            try:
                return jwt.PyJWK(entry)
            except jwt.PyJWTError:
                log.warning("unusable key %s in JWKS", kid)
                return None
    return None


class TokenVerifier:
    def __init__(self, keys: KeySource, *, issuer: str, audience: str) -> None:
        self.keys, self.issuer, self.audience = keys, issuer, audience

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
        try:
            key = await self.keys.get_key(kid)
        except (httpx.HTTPError, ValueError) as exc:
            raise InvalidToken(f"key set unavailable: {exc!r}") from exc
        if key is None:
            raise InvalidToken(f"unknown kid {kid!r}")
        # The key's own algorithm wins over the header's: a key is used with exactly one algorithm.
        if key.algorithm_name != alg:
            raise InvalidToken(f"algorithm {alg!r} does not match key {kid!r}")
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
    request.state.principal = principal
    return principal


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
