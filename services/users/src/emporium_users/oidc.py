"""A small OpenID Connect relying party: discovery, the authorization code flow with PKCE, ID token checks.

The protocol pieces that are easy to get wrong are library code: PyJWT verifies the ID token (signature,
``iss``, ``aud``, ``exp``, ``iat``) and ``emporium_common.auth.RemoteKeySet`` fetches and caches the
provider's key set (the same cache every service uses for our own tokens: async, refetches an unknown ``kid``
at most every 30 s, keeps the cached keys when the provider is briefly down). What is left here is the glue
the spec leaves to the client: the discovery document (cached, its ``issuer`` must be the configured one),
the authorize URL, the token request, and the ``nonce``/``azp`` checks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
from emporium_common.auth import RemoteKeySet

from .oidc_config import OIDCProvider

log = logging.getLogger("emporium.users.oidc")

# Asymmetric algorithms only: HS* would make the client secret a verification key, "none" is no signature.
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat"]
LEEWAY_SECONDS = 60  # clock skew between us and the provider
DISCOVERY_CACHE_SECONDS = 3600
DISCOVERY_RETRY_SECONDS = 30
HTTP_TIMEOUT = 10.0


class ProviderUnavailable(Exception):
    """The provider could not be reached or answered nonsense (a 503 for the caller, not their fault)."""


class LoginRefused(Exception):
    """The provider or the ID token said no; ``reason`` is safe to show (no token contents)."""

    def __init__(self, reason: str, code: str = "oidc_invalid_id_token") -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


def random_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Discovery:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    token_auth_methods: tuple[str, ...]


@dataclass(frozen=True)
class IdentityClaims:
    issuer: str
    subject: str
    email: str | None
    email_verified: bool
    preferred_username: str | None
    name: str | None


class ProviderClient:
    """One configured provider: its discovery document and key set, cached per process."""

    def __init__(self, config: OIDCProvider, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._transport = transport
        self._discovery: Discovery | None = None
        self._fetched_at = float("-inf")
        self._failed_at = float("-inf")
        self._lock = asyncio.Lock()
        self._keys: RemoteKeySet | None = None

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=HTTP_TIMEOUT, transport=self._transport, follow_redirects=False)

    async def discovery(self) -> Discovery:
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if self._discovery is not None and age < DISCOVERY_CACHE_SECONDS:
                return self._discovery
            if self._discovery is None and time.monotonic() - self._failed_at < DISCOVERY_RETRY_SECONDS / 10:
                raise ProviderUnavailable(f"{self.config.name}: discovery failed moments ago")
            try:
                self._discovery = await self._fetch_discovery()
                self._fetched_at = time.monotonic()
            except ProviderUnavailable:
                if self._discovery is None:
                    self._failed_at = time.monotonic()
                    raise
                log.warning(
                    "OIDC discovery refresh failed, keeping the cached document",
                    extra={"provider": self.config.name},
                )
                self._fetched_at = time.monotonic() - DISCOVERY_CACHE_SECONDS + DISCOVERY_RETRY_SECONDS
            return self._discovery

    async def _fetch_discovery(self) -> Discovery:
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            async with self._client() as client:
                response = await client.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            doc = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ProviderUnavailable(f"{self.config.name}: discovery at {url} failed: {exc!r}") from exc
        if not isinstance(doc, dict):
            raise ProviderUnavailable(f"{self.config.name}: discovery document is not an object")
        # OpenID Connect Discovery 1.0 §4.3: the issuer in the document must be exactly the one we asked.
        if doc.get("issuer") != self.config.issuer:
            raise ProviderUnavailable(
                f"{self.config.name}: discovery issuer {doc.get('issuer')!r} is not {self.config.issuer!r}"
            )
        try:
            advertised = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
            algorithms = tuple(a for a in advertised if a in ALLOWED_ALGORITHMS)
            methods = tuple(doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"])
            discovery = Discovery(
                issuer=doc["issuer"],
                authorization_endpoint=_url(doc["authorization_endpoint"]),
                token_endpoint=_url(doc["token_endpoint"]),
                jwks_uri=_url(doc["jwks_uri"]),
                algorithms=algorithms,
                token_auth_methods=methods,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderUnavailable(f"{self.config.name}: incomplete discovery document: {exc!r}") from exc
        if self._keys is None or self._keys.url != discovery.jwks_uri:
            self._keys = RemoteKeySet(discovery.jwks_uri, cache_seconds=3600, transport=self._transport)
        return discovery

    async def authorization_url(
        self, *, redirect_uri: str, state: str, nonce: str, code_verifier: str
    ) -> str:
        discovery = await self.discovery()
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce_challenge(code_verifier),
            "code_challenge_method": "S256",
        }
        separator = "&" if "?" in discovery.authorization_endpoint else "?"
        return discovery.authorization_endpoint + separator + urlencode(params)

    async def exchange_code(self, *, code: str, redirect_uri: str, code_verifier: str) -> str:
        """The provider's ID token for an authorization code (never logged, never returned to a client)."""
        discovery = await self.discovery()
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        auth = None
        secret = self.config.client_secret.get_secret_value() if self.config.client_secret else None
        if secret and "client_secret_basic" in discovery.token_auth_methods:
            auth = httpx.BasicAuth(_form_encode(self.config.client_id), _form_encode(secret))
        else:
            data["client_id"] = self.config.client_id
            if secret:
                data["client_secret"] = secret
        try:
            async with self._client() as client:
                response = await client.post(
                    discovery.token_endpoint, data=data, auth=auth, headers={"Accept": "application/json"}
                )
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{self.config.name}: token endpoint unreachable: {exc!r}") from exc
        if 400 <= response.status_code < 500:
            error = _oauth_error(response)
            log.info("OIDC token request refused", extra={"provider": self.config.name, "error": error})
            raise LoginRefused(
                f"The identity provider refused the authorization code ({error})", "oidc_code_rejected"
            )
        if response.status_code != 200:
            raise ProviderUnavailable(f"{self.config.name}: token endpoint answered {response.status_code}")
        try:
            body = response.json()
            id_token = body["id_token"]
            if not isinstance(id_token, str):
                raise TypeError("id_token is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise LoginRefused("The identity provider sent no ID token", "oidc_invalid_id_token") from exc
        return id_token

    async def verify_id_token(self, id_token: str, *, nonce: str) -> IdentityClaims:
        discovery = await self.discovery()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError as exc:
            raise LoginRefused("ID token is malformed") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in discovery.algorithms:
            raise LoginRefused(f"ID token algorithm {alg!r} is not accepted")
        if not isinstance(kid, str) or not kid:
            raise LoginRefused("ID token has no key id")
        assert self._keys is not None  # set by discovery()
        try:
            key = await self._keys.get_key(kid)
        except (httpx.HTTPError, ValueError) as exc:
            raise ProviderUnavailable(f"{self.config.name}: key set unavailable: {exc!r}") from exc
        if key is None:
            raise LoginRefused("ID token is signed with an unknown key")
        if key.algorithm_name != alg:
            raise LoginRefused("ID token algorithm does not match its key")
        try:
            claims = jwt.decode(
                id_token,
                key.key,
                algorithms=[alg],
                audience=self.config.client_id,
                issuer=self.config.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.InvalidAudienceError as exc:
            raise LoginRefused("ID token is for another audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise LoginRefused("ID token is from another issuer") from exc
        except jwt.ExpiredSignatureError as exc:
            raise LoginRefused("ID token has expired") from exc
        except jwt.InvalidSignatureError as exc:
            raise LoginRefused("ID token signature is invalid") from exc
        except jwt.PyJWTError as exc:
            raise LoginRefused(f"ID token is invalid ({exc})") from exc
        # OIDC Core §3.1.3.7: several audiences need azp, and an azp must be us.
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if (len(audiences) > 1 and azp is None) or (azp is not None and azp != self.config.client_id):
            raise LoginRefused("ID token is for another audience (azp)")
        token_nonce = claims.get("nonce")
        if not isinstance(token_nonce, str) or not hmac.compare_digest(token_nonce.encode(), nonce.encode()):
            raise LoginRefused("ID token nonce does not match this login", "oidc_nonce_mismatch")
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= 255:
            raise LoginRefused("ID token subject is invalid")
        email = claims.get("email")
        email = email.strip().lower() if isinstance(email, str) and 0 < len(email) <= 255 else None
        verified = claims.get("email_verified")
        return IdentityClaims(
            issuer=claims["iss"],
            subject=subject,
            email=email,
            # Some providers send the string "true" (OIDC says boolean); anything else is "not verified".
            email_verified=verified is True or verified == "true",
            preferred_username=_str_claim(claims, "preferred_username"),
            name=_str_claim(claims, "name"),
        )


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value


def _form_encode(value: str) -> str:
    # RFC 6749 §2.3.1: client_secret_basic credentials are form-urlencoded before base64.
    from urllib.parse import quote_plus

    return quote_plus(value)


def _oauth_error(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return (
        error
        if isinstance(error, str) and error.isascii() and len(error) <= 64
        else f"HTTP {response.status_code}"
    )


def _str_claim(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) and value else None
