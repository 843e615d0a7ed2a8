"""The session: one HttpOnly, SameSite=Lax cookie, sealed with AES-256-GCM (authenticated encryption).

Page JavaScript never sees a token: the cookie is HttpOnly and its content is encrypted with a key only
the server has (SESSION_KEY). It holds the signed-in user's access and refresh tokens, the cart, the CSRF
token, the checkout's idempotency key and one-shot flash messages. Stateless on the server, so any
replica can serve any request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import time
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("emporium.storefront.session")

AAD = b"emporium-storefront-session-v1"
MAX_CART_LINES = 30
MAX_COOKIE_BYTES = 4000


class Sealer:
    def __init__(self, key: str | None) -> None:
        if not key:
            log.warning("SESSION_KEY is not set: using a random key (sessions end when the process restarts)")
            raw = os.urandom(32)
        else:
            raw = hashlib.sha256(key.encode()).digest()
        self._aead = AESGCM(raw)

    def seal(self, data: dict[str, Any]) -> str:
        nonce = os.urandom(12)
        plain = json.dumps(data, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, plain, AAD)).decode().rstrip("=")

    def unseal(self, value: str) -> dict[str, Any] | None:
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            data = json.loads(self._aead.decrypt(raw[:12], raw[12:], AAD))
        except (ValueError, InvalidTag, TypeError):
            return None
        return data if isinstance(data, dict) else None


class Session(dict):
    """The session's data; ``modified`` makes the middleware send a new cookie."""

    modified = False

    def mark(self) -> None:
        self.modified = True

    # -- helpers used by the pages --------------------------------------------------------------------

    @property
    def csrf(self) -> str:
        if "csrf" not in self:
            self["csrf"] = secrets.token_urlsafe(24)
            self.mark()
        return self["csrf"]

    @property
    def user(self) -> dict[str, Any] | None:
        return self.get("user")

    @property
    def is_admin(self) -> bool:
        return "admin" in ((self.get("user") or {}).get("roles") or [])

    def flash(self, message: str, level: str = "info") -> None:
        self.setdefault("flash", []).append([level, message])
        self.mark()

    def pop_flashes(self) -> list[list[str]]:
        flashes = self.pop("flash", [])
        if flashes:
            self.mark()
        return flashes

    @property
    def cart(self) -> dict[str, int]:
        return self.get("cart") or {}

    def set_cart(self, cart: dict[str, int]) -> None:
        self["cart"] = {k: v for k, v in list(cart.items())[:MAX_CART_LINES] if v > 0}
        # A changed cart is a different order: a new idempotency key (the same key with another body
        # would be refused by the orders service).
        self["checkout_key"] = secrets.token_urlsafe(18)
        self.mark()

    @property
    def checkout_key(self) -> str:
        if "checkout_key" not in self:
            self["checkout_key"] = secrets.token_urlsafe(18)
            self.mark()
        return self["checkout_key"]

    def sign_in(self, tokens: dict[str, Any], user: dict[str, Any]) -> None:
        self["access_token"] = tokens["access_token"]
        self["refresh_token"] = tokens.get("refresh_token")
        self["access_exp"] = int(time.time()) + int(tokens.get("expires_in") or 900)
        self["user"] = user
        # A new CSRF token at sign-in (no fixation of a token seen before).
        self["csrf"] = secrets.token_urlsafe(24)
        self.mark()

    def update_tokens(self, tokens: dict[str, Any]) -> None:
        self["access_token"] = tokens["access_token"]
        self["refresh_token"] = tokens.get("refresh_token") or self.get("refresh_token")
        self["access_exp"] = int(time.time()) + int(tokens.get("expires_in") or 900)
        self.mark()

    def sign_out(self) -> None:
        for key in ("access_token", "refresh_token", "access_exp", "user"):
            self.pop(key, None)
        self["csrf"] = secrets.token_urlsafe(24)
        self.mark()


class SessionMiddleware:
    """Unseals the cookie into ``scope["session"]``; sends a new sealed cookie when it changed."""

    def __init__(self, app: ASGIApp, sealer: Sealer, *, secure: bool, max_age: int) -> None:
        self.app, self.sealer, self.secure, self.max_age = app, sealer, secure, max_age
        # __Host- cookies: Secure, Path=/, no Domain: no other (sub)domain or plain-http page can set it.
        self.cookie_name = "__Host-emporium_session" if secure else "emporium_session"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        cookie = HTTPConnection(scope).cookies.get(self.cookie_name)
        data = self.sealer.unseal(cookie) if cookie else None
        session = Session(data or {})
        if cookie and data is None:
            session.mark()  # an unreadable cookie (old key, tampered): replace it
        scope["session"] = session

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start" and session.modified:
                headers = MutableHeaders(scope=message)
                headers.append("Set-Cookie", self.cookie_header(session))
            await send(message)

        await self.app(scope, receive, send_with_cookie if scope["type"] == "http" else send)

    def cookie_header(self, session: Session) -> str:
        value = self.sealer.seal(dict(session))
        if len(value) > MAX_COOKIE_BYTES:  # never silently dropped by the browser: shed the flashes
            session.pop("flash", None)
            value = self.sealer.seal(dict(session))
        parts = [
            f"{self.cookie_name}={value}",
            "Path=/",
            f"Max-Age={self.max_age}",
            "HttpOnly",
            "SameSite=Lax",
        ]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)
