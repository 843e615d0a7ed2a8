"""/users: register, login (JSON or OAuth2 password form), refresh, logout, me."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from emporium_common import AppError, ErrorResponse, SessionDep
from emporium_common.auth import UNAUTHORIZED_HEADERS
from fastapi import APIRouter, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .. import crud
from ..deps import ClientAddress, CurrentUser, KeysDep, SettingsDep
from ..models import LoginRequest, RefreshRequest, Token, User, UserCreate, UserPublic
from ..security import create_access_token, hashing

log = logging.getLogger("emporium.users")

router = APIRouter(prefix="/users", tags=["users"])

INVALID_LOGIN = "Invalid email or password"
INVALID_REFRESH = "Invalid refresh token"


def _public(user: User) -> UserPublic:
    return UserPublic.model_validate(user, from_attributes=True)


def _errors(status_code: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {status_code: {"model": ErrorResponse, "description": description}}


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=UserPublic,
    responses={
        **_errors(409, "The email or the username is already registered"),
        **_errors(429, "Too many registrations from this address"),
    },
)
async def register(
    user_in: UserCreate, session: SessionDep, settings: SettingsDep, address: ClientAddress
) -> UserPublic:
    attempt_id, recent = await crud.begin_registration(
        session=session, address=address, window=timedelta(seconds=settings.register_window_seconds)
    )
    if recent > settings.register_max_per_address:
        await crud.forget_registration(session=session, attempt_id=attempt_id)
        log.warning("registration throttled", extra={"client_address": address})
        raise _too_many("Too many registrations, try again later", settings.register_window_seconds)
    try:
        user = await crud.create_user(session=session, user_create=user_in)
    except crud.DuplicateUser:
        # One message for both cases: which one is taken is nobody's business (account enumeration).
        raise AppError(409, "Email or username is already registered", "conflict") from None
    log.info("user registered", extra={"user_id": user.id})
    return _public(user)


def _too_many(detail: str, retry_after: float) -> AppError:
    return AppError(429, detail, "too_many_requests", {"Retry-After": str(max(1, round(retry_after)))})


async def _issue_tokens(*, session, user: User, keys, settings, family_id=None) -> Token:
    access_token, expires_in = create_access_token(user, keys, settings)
    refresh_token = await crud.issue_refresh_token(
        session=session, user=user, lifetime=timedelta(days=settings.refresh_token_days), family_id=family_id
    )
    await session.commit()
    return Token(access_token=access_token, expires_in=expires_in, refresh_token=refresh_token)


async def _login_request(request: Request) -> LoginRequest:
    """JSON ``{email, password}``, or the OAuth2 password form (``username`` carries the email)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.form()
            data: Any = {"email": form.get("username") or form.get("email"), "password": form.get("password")}
            data = {k: v for k, v in data.items() if isinstance(v, str)}
        else:
            try:
                data = await request.json()
            except ValueError:
                raise RequestValidationError(
                    [{"loc": ("body",), "msg": "JSON body expected", "type": "json_invalid"}]
                ) from None
        return LoginRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        ) from None


_LOGIN_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": LoginRequest.model_json_schema()},
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "required": ["username", "password"],
                "properties": {
                    "grant_type": {"type": "string", "enum": ["password"]},
                    "username": {"type": "string", "description": "the account's email"},
                    "password": {"type": "string"},
                },
            }
        },
    },
}


@router.post(
    "/login",
    response_model=Token,
    openapi_extra={"requestBody": _LOGIN_BODY},
    responses={
        **_errors(401, INVALID_LOGIN),
        **_errors(422, "Validation error"),
        **_errors(429, "Too many login attempts"),
    },
)
async def login(
    request: Request, session: SessionDep, keys: KeysDep, settings: SettingsDep, address: ClientAddress
) -> Token:
    credentials = await _login_request(request)
    email = credentials.email
    attempt_id = await crud.begin_login_attempt(session=session, email=email, address=address)
    failures = await crud.count_login_failures(
        session=session,
        email=email,
        address=address,
        account_window=timedelta(seconds=settings.login_account_window_seconds),
        address_window=timedelta(seconds=settings.login_address_window_seconds),
    )
    # Each count includes this attempt: the n-th concurrent attempt sees at least n.
    if failures.account_at_address > settings.login_max_failures_per_account:
        retry_after = settings.login_account_window_seconds
    elif failures.address > settings.login_max_failures_per_address:
        retry_after = settings.login_address_window_seconds
    else:
        retry_after = None
    if retry_after is not None:
        await crud.forget_login_attempt(session=session, attempt_id=attempt_id)
        await session.commit()
        log.warning("login throttled", extra={"client_address": address})
        raise _too_many("Too many login attempts, try again later", retry_after)
    excess = failures.account - settings.login_slowdown_after_failures
    if excess > 0:
        # Someone is guessing this account from many addresses: slow every check of it down (doubling per
        # failure, capped) instead of locking its owner out.
        await asyncio.sleep(min(settings.login_slowdown_max_seconds, 0.25 * 2 ** min(excess, 10)))

    user = await crud.get_user_by_email(session=session, email=email)
    # bcrypt takes ~0.25 s of CPU: on the bounded bcrypt threads, so other requests keep flowing meanwhile.
    ok = await hashing.verify(credentials.password, user.hashed_password if user else None)
    ok = ok and user is not None and user.is_active
    if not ok:
        await session.commit()
        # Same message for unknown email, wrong password and inactive account.
        raise AppError(401, INVALID_LOGIN, "unauthorized", UNAUTHORIZED_HEADERS)
    await crud.mark_login_succeeded(session=session, attempt_id=attempt_id)
    return await _issue_tokens(session=session, user=user, keys=keys, settings=settings)


@router.post("/refresh", response_model=Token, responses=_errors(401, INVALID_REFRESH))
async def refresh(body: RefreshRequest, session: SessionDep, keys: KeysDep, settings: SettingsDep) -> Token:
    """New tokens for a refresh token. Each works once; presenting a spent one revokes its family."""
    spent = await crud.spend_refresh_token(session=session, token=body.refresh_token)
    user = await crud.get_user(session=session, user_id=spent.user_id) if spent else None
    if spent is None or user is None or not user.is_active:
        await session.commit()  # keeps a reuse-triggered revocation
        raise AppError(401, INVALID_REFRESH, "unauthorized", UNAUTHORIZED_HEADERS)
    return await _issue_tokens(
        session=session, user=user, keys=keys, settings=settings, family_id=spent.family_id
    )


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(body: RefreshRequest, session: SessionDep) -> None:
    """Revoke the session of this refresh token (its whole family). Always 204: says nothing about the token.

    Access tokens already issued stay valid until they expire (15 minutes by default).
    """
    await crud.revoke_refresh_token_family(session=session, token=body.refresh_token)
    await session.commit()


@router.get("/me", response_model=UserPublic, responses=_errors(401, "Missing, invalid or expired token"))
async def me(user: CurrentUser) -> UserPublic:
    return _public(user)
