"""What every page shares: templates (autoescaped), the session and token helpers, CSRF, security headers."""

from __future__ import annotations

import hmac
import logging
import time
import zlib
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jwt
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .session import Session
from .upstream import ApiError, Upstream

log = logging.getLogger("emporium.storefront")
HERE = Path(__file__).parent

# No inline script or style anywhere: scripts and styles come from /static only.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
CATEGORY_COLOURS = ["#1e3a8a", "#7c2d12", "#14532d", "#581c87", "#831843", "#134e4a", "#713f12", "#312e81"]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app, self.hsts = app, hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if self.hsts:
                    headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
                # Pages carry per-user content and CSRF tokens: never cached; assets are.
                headers.setdefault("Cache-Control", "public, max-age=3600" if static else "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def money(value: Any) -> str:
    try:
        return f"€{Decimal(str(value)):,.2f}"
    except (InvalidOperation, ValueError):
        return str(value)


def colour(name: str | None) -> str:
    return CATEGORY_COLOURS[zlib.crc32((name or "").encode()) % len(CATEGORY_COLOURS)]


def initials(name: str) -> str:
    words = [w for w in name.split() if w[:1].isalnum()]
    return "".join(w[0] for w in words[:2]).upper() or "?"


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,
)
templates.filters.update(money=money, colour=colour, initials=initials, urlquote=lambda s: quote(str(s)))


class LoginRequired(Exception):
    """The page needs a signed-in user (or the session expired): to the sign-in page, back here after."""


class AdminRequired(Exception):
    """The page is for administrators."""


class CsrfFailed(Exception):
    """A state-changing form without the session's CSRF token (or from another origin)."""


def session_of(request: Request) -> Session:
    return request.scope["session"]


def upstream_of(request: Request) -> Upstream:
    return request.app.state.upstream


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    session = session_of(request)
    html = templates.get_template(template).render(
        request=request,
        path=request.url.path,
        session=session,
        user=session.user,
        is_admin=session.is_admin,
        csrf_token=session.csrf,
        flashes=session.pop_flashes(),
        cart_count=sum(session.cart.values()),
        **context,
    )
    return HTMLResponse(html, status_code=status_code)


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def safe_next(value: str | None, default: str = "/") -> str:
    """Only local paths: never an open redirect to another site."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    parts = urlsplit(value)
    return default if parts.scheme or parts.netloc else value


async def check_csrf(request: Request) -> dict[str, Any]:
    """Every state-changing form: the session's token must come back; the Origin (if sent) must be ours."""
    form = await request.form()
    session = session_of(request)
    sent = str(form.get("csrf_token", ""))
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise CsrfFailed
    if not sent or "csrf" not in session or not hmac.compare_digest(sent, session["csrf"]):
        raise CsrfFailed
    return {k: v for k, v in form.items() if isinstance(v, str)}


def user_from_token(access_token: str, profile: dict[str, Any] | None = None) -> dict[str, Any]:
    # The token comes straight from the users service (cluster network); the services verify it on use.
    claims = jwt.decode(access_token, options={"verify_signature": False})
    profile = profile or {}
    return {
        "id": str(claims.get("sub")),
        "email": profile.get("email") or claims.get("email"),
        "username": profile.get("username") or claims.get("email"),
        "roles": list(claims.get("roles") or profile.get("roles") or []),
    }


async def fresh_token(request: Request, *, required: bool = True) -> str | None:
    """The user's access token, refreshed silently when it is about to expire."""
    session = session_of(request)
    token = session.get("access_token")
    if not token:
        if required:
            raise LoginRequired
        return None
    if session.get("access_exp", 0) - time.time() > 60:
        return token
    refresh = session.get("refresh_token")
    try:
        if not refresh:
            raise ApiError("users", 401, "no refresh token")
        tokens = await upstream_of(request).refresh(refresh)
    except ApiError:
        session.sign_out()
        if required:
            session.flash("Your session has expired. Please sign in again.", "warning")
            raise LoginRequired from None
        return None
    session.update_tokens(tokens)
    session["user"] = user_from_token(tokens["access_token"], session.user)
    return session["access_token"]


async def admin_token(request: Request) -> str:
    token = await fresh_token(request)
    if not session_of(request).is_admin:
        raise AdminRequired
    return token  # type: ignore[return-value]


def expired(request: Request) -> LoginRequired:
    """An upstream 401: the token is no longer accepted (revoked, expired, account disabled)."""
    session = session_of(request)
    session.sign_out()
    session.flash("Your session has expired. Please sign in again.", "warning")
    return LoginRequired()
