"""/auth/oidc: sign in (or sign up) with an OpenID Connect provider, and link one to a signed-in account.

Browser flow: ``GET /auth/oidc/<provider>/start?return_to=/somewhere`` -> the provider -> ``GET
/auth/oidc/<provider>/callback`` -> 303 to ``return_to?login_code=<one-time code>`` -> the client POSTs the
code to ``/auth/oidc/token`` and gets the usual tokens. No token ever travels in a URL: the login code works
once, for a minute, and only at that endpoint. Every refusal is a 4xx with a ``code`` saying why.
"""

from __future__ import annotations

import hmac
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from emporium_common import AppError, SessionDep
from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import TypeAdapter, ValidationError

from .. import crud
from ..config import UsersSettings
from ..deps import CurrentUser, KeysDep, SettingsDep
from ..models import (
    Email,
    OIDCAuthorization,
    OIDCCodeExchange,
    OIDCLinkRequest,
    OIDCLoginCodeResponse,
    OIDCLoginState,
    OIDCProviderPublic,
    Token,
    User,
)
from ..oidc import IdentityClaims, LoginRefused, ProviderClient, ProviderUnavailable, random_token, sha256_hex
from .users import _errors, _issue_tokens

log = logging.getLogger("emporium.users.oidc")

router = APIRouter(prefix="/auth/oidc", tags=["oidc"])

COOKIE = "emporium_oidc"
COOKIE_PATH = "/auth/oidc"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache", "Referrer-Policy": "no-referrer"}
_COOKIE_VALUE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")
_EMAIL = TypeAdapter(Email)


def _clients(request: Request) -> dict[str, ProviderClient]:
    return request.app.state.oidc_clients


def _client(request: Request, name: str) -> ProviderClient:
    client = _clients(request).get(name)
    if client is None:
        raise AppError(404, "Unknown identity provider", "not_found")
    return client


def _unavailable(exc: ProviderUnavailable) -> AppError:
    log.warning("identity provider unavailable: %s", exc)
    return AppError(503, "The identity provider is unavailable, try again later", "provider_unavailable")


def _refused(exc: LoginRefused) -> AppError:
    log.info("OIDC login refused: %s", exc.reason, extra={"code": exc.code})
    return AppError(400, exc.reason, exc.code)


def _check_return_to(return_to: str | None, settings: UsersSettings) -> str | None:
    """A path on this site, or a URL on an allowed origin: never an open redirect."""
    if not return_to:
        return None
    bad = AppError(
        400, "return_to must be a path on this site or an allowed origin", "oidc_invalid_return_to"
    )
    if any(ord(ch) < 33 or ch == "\\" for ch in return_to):
        raise bad
    parts = urlsplit(return_to)
    if not parts.scheme and not parts.netloc:
        if not return_to.startswith("/") or return_to.startswith("//"):
            raise bad
        return return_to
    origin = f"{parts.scheme}://{parts.netloc}".lower()
    if parts.scheme not in ("http", "https") or origin not in {
        o.rstrip("/").lower() for o in settings.oidc_allowed_return_origins
    }:
        raise bad
    return return_to


def _redirect_uri(request: Request, settings: UsersSettings, provider: str) -> str:
    base = settings.oidc_redirect_base_url or str(request.base_url)
    return f"{base.rstrip('/')}{COOKIE_PATH}/{provider}/callback"


async def _begin(
    request: Request,
    session: SessionDep,
    settings: UsersSettings,
    client: ProviderClient,
    return_to: str | None,
    link_user_id: int | None = None,
) -> tuple[str, str]:
    """Record a started login; returns the provider's authorize URL and the browser cookie's value."""
    # One binding value per browser (kept across tabs, so two logins started in two tabs both work).
    browser = request.cookies.get(COOKIE, "")
    if not _COOKIE_VALUE.match(browser):
        browser = random_token()
    state, nonce, verifier = random_token(), random_token(), random_token(48)
    redirect_uri = _redirect_uri(request, settings, client.config.name)
    try:
        url = await client.authorization_url(
            redirect_uri=redirect_uri, state=state, nonce=nonce, code_verifier=verifier
        )
    except ProviderUnavailable as exc:
        raise _unavailable(exc) from None
    await crud.add_login_state(
        session=session,
        state=OIDCLoginState(
            state_hash=sha256_hex(state),
            provider=client.config.name,
            nonce=nonce,
            code_verifier=verifier,
            browser_hash=sha256_hex(browser),
            redirect_uri=redirect_uri,
            return_to=return_to,
            link_user_id=link_user_id,
            expires_at=datetime.now(UTC) + timedelta(seconds=settings.oidc_login_timeout_seconds),
        ),
    )
    await session.commit()
    return url, browser


def _set_cookie(response: Any, value: str, settings: UsersSettings) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=settings.oidc_login_timeout_seconds,
        path=COOKIE_PATH,
        httponly=True,
        secure=settings.oidc_cookie_secure,
        samesite="lax",  # sent on the provider's top-level redirect back to us, not on cross-site subrequests
    )


@router.get("/providers", response_model=list[OIDCProviderPublic])
def providers(request: Request) -> list[OIDCProviderPublic]:
    """The configured providers, in configuration order (one sign-in button each)."""
    return [
        OIDCProviderPublic(
            name=name, display_name=c.config.display_name, start_url=f"{COOKIE_PATH}/{name}/start"
        )
        for name, c in _clients(request).items()
    ]


@router.get(
    "/{provider}/start",
    status_code=status.HTTP_302_FOUND,
    response_class=RedirectResponse,
    responses={
        302: {"description": "To the provider's sign-in page"},
        **_errors(400, "return_to is not allowed"),
        **_errors(404, "Unknown identity provider"),
        **_errors(503, "The identity provider is unavailable"),
    },
)
async def start(
    provider: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    return_to: str | None = Query(default=None, max_length=2048),
) -> RedirectResponse:
    """Start signing in (a new account is made on first sign-in). Open it in the browser, not with fetch."""
    client = _client(request, provider)
    url, browser = await _begin(request, session, settings, client, _check_return_to(return_to, settings))
    response = RedirectResponse(url, status_code=status.HTTP_302_FOUND, headers=NO_STORE)
    _set_cookie(response, browser, settings)
    return response


@router.post(
    "/{provider}/link",
    response_model=OIDCAuthorization,
    responses={
        **_errors(400, "return_to is not allowed"),
        **_errors(401, "Missing, invalid or expired token"),
        **_errors(404, "Unknown identity provider"),
        **_errors(503, "The identity provider is unavailable"),
    },
)
async def link(
    provider: str,
    body: OIDCLinkRequest,
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
) -> JSONResponse:
    """Link a provider account to the caller's account: send the browser to ``authorization_url`` (same
    browser: the response sets the cookie the callback checks). The provider must assert email_verified."""
    client = _client(request, provider)
    url, browser = await _begin(
        request, session, settings, client, _check_return_to(body.return_to, settings), link_user_id=user.id
    )
    response = JSONResponse(OIDCAuthorization(authorization_url=url).model_dump(), headers=NO_STORE)
    _set_cookie(response, browser, settings)
    return response


@router.get(
    "/{provider}/callback",
    response_model=OIDCLoginCodeResponse,
    responses={
        303: {"description": "To return_to, with ?login_code=<one-time code> (or ?login_error=<code>)"},
        **_errors(
            400, "Forged, used or expired state; another browser; the provider said no; invalid ID token"
        ),
        **_errors(403, "The provider did not verify the email (linking), or the account is inactive"),
        **_errors(404, "Unknown identity provider"),
        **_errors(
            409, "An account with this email exists (link it while signed in), or the identity is taken"
        ),
        **_errors(503, "The identity provider is unavailable"),
    },
)
async def callback(
    provider: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    state: str | None = Query(default=None, max_length=256),
    code: str | None = Query(default=None, max_length=2048),
    error: str | None = Query(default=None, max_length=256),
) -> Any:
    """Where the provider sends the browser back. Ends in a one-time login code (never in tokens)."""
    client = _client(request, provider)
    if not state:
        raise AppError(400, "Missing state", "oidc_invalid_state")
    started = await crud.take_login_state(session=session, state_hash=sha256_hex(state), provider=provider)
    await session.commit()  # spent, whatever happens next: a callback URL works once
    if started is None:
        raise AppError(400, "Unknown, already used or expired sign-in state", "oidc_invalid_state")
    browser = request.cookies.get(COOKIE, "")
    if not hmac.compare_digest(sha256_hex(browser), started.browser_hash):
        raise AppError(400, "This sign-in was started in another browser", "oidc_invalid_state")
    # From here on the login is this browser's own: a refusal goes back to return_to as ?login_error=<code>
    # (the page shows a message), or is the 4xx itself for API clients.
    try:
        user = await _finish(session, client, started, code, error)
    except AppError as refusal:
        if not started.return_to or refusal.status_code >= 500:
            raise
        await session.rollback()
        target = _append(started.return_to, "login_error", refusal.code)
        return RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER, headers=NO_STORE)
    login_code = random_token()
    await crud.add_login_code(
        session=session,
        user=user,
        code_hash=sha256_hex(login_code),
        lifetime=timedelta(seconds=settings.oidc_code_lifetime_seconds),
    )
    await session.commit()
    log.info(
        "OIDC sign-in", extra={"provider": provider, "user_id": user.id, "linked": bool(started.link_user_id)}
    )
    if started.return_to:
        target = _append(started.return_to, "login_code", login_code)
        return RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER, headers=NO_STORE)
    body = OIDCLoginCodeResponse(code=login_code, expires_in=settings.oidc_code_lifetime_seconds)
    return JSONResponse(body.model_dump(), headers=NO_STORE)


def _append(url: str, name: str, value: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{name}={value}"


async def _finish(
    session: SessionDep, client: ProviderClient, started: OIDCLoginState, code: str | None, error: str | None
) -> User:
    """The provider's answer -> a verified identity -> the account (AppError with a code otherwise)."""
    if error:
        reason = error if re.fullmatch(r"[a-z_]{1,64}", error) else "error"
        raise AppError(400, f"The identity provider did not sign you in ({reason})", "oidc_provider_error")
    if not code:
        raise AppError(400, "Missing authorization code", "oidc_invalid_request")
    try:
        id_token = await client.exchange_code(
            code=code, redirect_uri=started.redirect_uri, code_verifier=started.code_verifier
        )
        claims = await client.verify_id_token(id_token, nonce=started.nonce)
    except LoginRefused as exc:
        raise _refused(exc) from None
    except ProviderUnavailable as exc:
        raise _unavailable(exc) from None
    return await _account_for(session, client, claims, started.link_user_id)


async def _account_for(
    session: SessionDep, client: ProviderClient, claims: IdentityClaims, link_user_id: int | None
) -> User:
    """The account this identity signs in to: linked, found by (issuer, sub), or new. Never found by email
    alone: an existing account is linked only with a verified email and proof of ownership (signed in) or
    the operator's consent for this provider (auto_link_verified_email)."""
    provider = client.config
    identity = await crud.get_identity(session=session, issuer=claims.issuer, subject=claims.subject)
    if link_user_id is not None:
        if not claims.email_verified:
            raise AppError(
                403,
                f"{provider.display_name} did not verify this email address: it cannot be linked",
                "oidc_email_not_verified",
            )
        if identity is not None and identity.user_id != link_user_id:
            raise AppError(
                409,
                f"This {provider.display_name} account is linked to another account",
                "oidc_identity_in_use",
            )
        if identity is None:
            await _link(session, provider.name, claims, link_user_id)
        user = await crud.get_user(session=session, user_id=link_user_id)
    elif identity is not None:
        identity.last_login_at = datetime.now(UTC)
        session.add(identity)
        user = await crud.get_user(session=session, user_id=identity.user_id)
    else:
        user = await _sign_up_or_link(session, client, claims)
    if user is None or not user.is_active:
        raise AppError(403, "This account is inactive", "forbidden")
    return user


async def _link(session: SessionDep, provider: str, claims: IdentityClaims, user_id: int) -> None:
    try:
        await crud.add_identity(
            session=session,
            user_id=user_id,
            provider=provider,
            issuer=claims.issuer,
            subject=claims.subject,
            email=claims.email,
        )
    except crud.IdentityTaken:
        raise AppError(
            409, "This identity was linked to an account at the same moment", "oidc_identity_in_use"
        ) from None


async def _sign_up_or_link(session: SessionDep, client: ProviderClient, claims: IdentityClaims) -> User:
    provider = client.config
    if claims.email is None:
        raise AppError(
            400,
            f"{provider.display_name} did not share an email address (scope 'email')",
            "oidc_email_missing",
        )
    try:
        email = _EMAIL.validate_python(claims.email)
    except ValidationError:
        raise AppError(
            400, f"{provider.display_name}'s email address is not usable here", "oidc_email_invalid"
        ) from None
    existing = await crud.get_user_by_email(session=session, email=email)
    if existing is not None:
        if not claims.email_verified:
            raise AppError(
                403,
                f"An account with this email exists and {provider.display_name} did not verify the address: "
                "it is not linked",
                "oidc_email_not_verified",
            )
        if not provider.auto_link_verified_email:
            raise AppError(
                409,
                "An account with this email exists: sign in with your password, "
                f"then link {provider.display_name}",
                "oidc_link_required",
            )
        await _link(session, provider.name, claims, existing.id)
        return existing
    hint = claims.preferred_username or email.split("@", 1)[0]
    try:
        user = await crud.create_external_user(session=session, email=email, username_hint=hint)
    except crud.DuplicateUser:
        raise AppError(409, "An account with this email was created at the same moment", "conflict") from None
    await _link(session, provider.name, claims, user.id)
    log.info("user registered", extra={"user_id": user.id, "provider": provider.name})
    return user


@router.post(
    "/token",
    response_model=Token,
    responses=_errors(400, "Unknown, used or expired login code"),
)
async def token(body: OIDCCodeExchange, session: SessionDep, keys: KeysDep, settings: SettingsDep) -> Token:
    """Exchange the one-time login code from the callback for an access and a refresh token."""
    user_id = await crud.take_login_code(session=session, code_hash=sha256_hex(body.code))
    user = await crud.get_user(session=session, user_id=user_id) if user_id is not None else None
    if user is None or not user.is_active:
        await session.commit()
        raise AppError(400, "Unknown, already used or expired login code", "oidc_invalid_code")
    return await _issue_tokens(session=session, user=user, keys=keys, settings=settings)
