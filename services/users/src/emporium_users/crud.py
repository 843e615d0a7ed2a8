"""Plain data-access functions (keyword-only arguments, one session passed in)."""

from __future__ import annotations

import random
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from emporium_common.events import USER_REGISTERED
from emporium_common.outbox import add_event
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import (
    ExternalIdentity,
    LoginAttempt,
    OIDCLoginCode,
    OIDCLoginState,
    RefreshToken,
    RegistrationAttempt,
    Role,
    User,
    UserCreate,
)
from .security import hash_refresh_token, hashing, new_refresh_token


class DuplicateUser(Exception):
    """The email or the username is taken (deliberately not saying which)."""


async def create_user(*, session: AsyncSession, user_create: UserCreate, role: Role = Role.customer) -> User:
    hashed_password = await hashing.hash(user_create.password)  # CPU-bound: on the bounded bcrypt threads
    user = User(
        email=user_create.email, username=user_create.username, hashed_password=hashed_password, role=role
    )
    session.add(user)
    try:
        # The unique constraints decide, not a SELECT first: that would race with a concurrent register.
        await session.flush()
        # user.registered commits with the user (transactional outbox; the relay publishes it).
        add_event(
            session,
            USER_REGISTERED,
            {"user_id": str(user.id), "email": user.email, "username": user.username},
        )
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise DuplicateUser from None
    await session.refresh(user)  # server-side timestamps
    return user


async def get_user(*, session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


async def get_user_by_email(*, session: AsyncSession, email: str) -> User | None:
    return (await session.exec(select(User).where(User.email == email))).scalars().first()


async def ensure_admin(*, session: AsyncSession, email: str, username: str, password: str) -> User:
    """Create the admin account, or give an existing account with that email the admin role."""
    user = await get_user_by_email(session=session, email=email)
    if user is None:
        return await create_user(
            session=session,
            user_create=UserCreate(email=email, username=username, password=password),
            role=Role.admin,
        )
    if user.role != Role.admin:
        user.role = Role.admin
        session.add(user)
        await session.commit()
        await session.refresh(user)
    return user


# Refresh tokens


async def issue_refresh_token(
    *, session: AsyncSession, user: User, lifetime: timedelta, family_id: uuid.UUID | None = None
) -> str:
    token, token_hash = new_refresh_token()
    session.add(
        RefreshToken(
            user_id=user.id,
            family_id=family_id or uuid.uuid4(),
            token_hash=token_hash,
            expires_at=datetime.now(UTC) + lifetime,
        )
    )
    return token


async def spend_refresh_token(*, session: AsyncSession, token: str) -> RefreshToken | None:
    """Mark a refresh token used and return it; None when it is unknown, expired, revoked or spent.

    A token presented a second time means it leaked (or its owner's was): the whole family is revoked,
    so whoever holds the newer token has to log in again too.
    """
    token_hash = hash_refresh_token(token)
    now = datetime.now(UTC)
    # One atomic UPDATE: two concurrent refreshes with the same token cannot both succeed.
    spent = (
        await session.exec(
            update(RefreshToken)
            .where(
                RefreshToken.token_hash == token_hash,
                RefreshToken.used_at.is_(None),
                RefreshToken.revoked_at.is_(None),
                RefreshToken.expires_at > now,
            )
            .values(used_at=now)
            .returning(RefreshToken.id)
        )
    ).first()
    if spent is not None:
        return await session.get(RefreshToken, spent[0])
    known = (
        (await session.exec(select(RefreshToken).where(RefreshToken.token_hash == token_hash)))
        .scalars()
        .first()
    )
    if known is not None and known.used_at is not None:
        await revoke_family(session=session, family_id=known.family_id)
    return None


async def revoke_family(*, session: AsyncSession, family_id: uuid.UUID) -> None:
    await session.exec(
        update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )


async def revoke_refresh_token_family(*, session: AsyncSession, token: str) -> None:
    known = (
        (await session.exec(select(RefreshToken).where(RefreshToken.token_hash == hash_refresh_token(token))))
        .scalars()
        .first()
    )
    if known is not None:
        await revoke_family(session=session, family_id=known.family_id)


# Login throttling


@dataclass(frozen=True)
class FailureCounts:
    """Failed password checks in their windows, the current attempt included (counted as failed until it
    succeeds)."""

    account_at_address: int
    address: int
    account: int


async def begin_login_attempt(*, session: AsyncSession, email: str, address: str) -> int:
    """Record an attempt as failed and commit it *before* counting: concurrent attempts then always see each
    other, so a burst cannot slip past the limit. Returns its id (``mark_login_succeeded`` flips it)."""
    attempt = LoginAttempt(email=email, client_address=address, succeeded=False)
    session.add(attempt)
    await session.commit()
    if random.random() < 0.01:  # noqa: S311 - housekeeping now and then, not security
        cutoff = datetime.now(UTC) - timedelta(days=1)
        await session.exec(delete(LoginAttempt).where(LoginAttempt.attempted_at < cutoff))
        await session.exec(delete(RegistrationAttempt).where(RegistrationAttempt.attempted_at < cutoff))
        await session.commit()
    return attempt.id


async def count_login_failures(
    *, session: AsyncSession, email: str, address: str, account_window: timedelta, address_window: timedelta
) -> FailureCounts:
    now = datetime.now(UTC)
    failed = LoginAttempt.succeeded.is_(False)
    in_account_window = LoginAttempt.attempted_at > now - account_window
    in_address_window = LoginAttempt.attempted_at > now - address_window
    at_address, of_account = LoginAttempt.client_address == address, LoginAttempt.email == email
    query = select(
        func.count().filter(of_account, at_address, in_account_window),
        func.count().filter(at_address, in_address_window),
        func.count().filter(of_account, in_account_window),
    ).where(
        failed,
        or_(at_address, of_account),
        LoginAttempt.attempted_at > now - max(account_window, address_window),
    )
    row = (await session.exec(query)).one()
    return FailureCounts(account_at_address=row[0], address=row[1], account=row[2])


async def forget_login_attempt(*, session: AsyncSession, attempt_id: int) -> None:
    """A refused (throttled) attempt checked no password: it does not count."""
    await session.exec(delete(LoginAttempt).where(LoginAttempt.id == attempt_id))


async def mark_login_succeeded(*, session: AsyncSession, attempt_id: int) -> None:
    await session.exec(update(LoginAttempt).where(LoginAttempt.id == attempt_id).values(succeeded=True))


async def begin_registration(*, session: AsyncSession, address: str, window: timedelta) -> tuple[int, int]:
    """Record a registration attempt (committed first, like logins) and count the address's attempts in the
    window, this one included. Returns (id, count)."""
    attempt = RegistrationAttempt(client_address=address)
    session.add(attempt)
    await session.commit()
    count = (
        await session.exec(
            select(func.count())
            .select_from(RegistrationAttempt)
            .where(
                RegistrationAttempt.client_address == address,
                RegistrationAttempt.attempted_at > datetime.now(UTC) - window,
            )
        )
    ).scalar_one()
    return attempt.id, count


async def forget_registration(*, session: AsyncSession, attempt_id: int) -> None:
    await session.exec(delete(RegistrationAttempt).where(RegistrationAttempt.id == attempt_id))
    await session.commit()


# Sign-in with OpenID Connect providers


async def add_login_state(*, session: AsyncSession, state: OIDCLoginState) -> None:
    session.add(state)
    if random.random() < 0.05:  # noqa: S311 - housekeeping now and then, not security
        now = datetime.now(UTC)
        await session.exec(delete(OIDCLoginState).where(OIDCLoginState.expires_at < now))
        await session.exec(delete(OIDCLoginCode).where(OIDCLoginCode.expires_at < now))


async def take_login_state(*, session: AsyncSession, state_hash: str, provider: str) -> OIDCLoginState | None:
    """The started login with this state, removed so it cannot be used twice; None if unknown or expired."""
    row = (
        await session.exec(
            delete(OIDCLoginState)
            .where(
                OIDCLoginState.state_hash == state_hash,
                OIDCLoginState.provider == provider,
                OIDCLoginState.expires_at > datetime.now(UTC),
            )
            .returning(*OIDCLoginState.__table__.columns)
        )
    ).first()
    return OIDCLoginState(**row._mapping) if row is not None else None


async def add_login_code(*, session: AsyncSession, user: User, code_hash: str, lifetime: timedelta) -> None:
    session.add(OIDCLoginCode(code_hash=code_hash, user_id=user.id, expires_at=datetime.now(UTC) + lifetime))


async def take_login_code(*, session: AsyncSession, code_hash: str) -> int | None:
    """The user id of a one-time login code, spending it; None if unknown, spent or expired."""
    row = (
        await session.exec(
            delete(OIDCLoginCode)
            .where(OIDCLoginCode.code_hash == code_hash, OIDCLoginCode.expires_at > datetime.now(UTC))
            .returning(OIDCLoginCode.user_id)
        )
    ).first()
    return row[0] if row is not None else None


async def get_identity(*, session: AsyncSession, issuer: str, subject: str) -> ExternalIdentity | None:
    query = select(ExternalIdentity).where(
        ExternalIdentity.issuer == issuer, ExternalIdentity.subject == subject
    )
    return (await session.exec(query)).scalars().first()


async def list_identities(*, session: AsyncSession, user_id: int) -> list[ExternalIdentity]:
    query = select(ExternalIdentity).where(ExternalIdentity.user_id == user_id).order_by(ExternalIdentity.id)
    return list((await session.exec(query)).scalars().all())


class IdentityTaken(Exception):
    """This (issuer, sub) already belongs to an account."""


async def add_identity(
    *, session: AsyncSession, user_id: int, provider: str, issuer: str, subject: str, email: str | None
) -> ExternalIdentity:
    identity = ExternalIdentity(
        user_id=user_id, provider=provider, issuer=issuer, subject=subject, email=email
    )
    try:
        async with (
            session.begin_nested()
        ):  # a concurrent callback for the same identity: the constraint decides
            session.add(identity)
            await session.flush()
    except IntegrityError:
        raise IdentityTaken from None
    return identity


def _username_base(hint: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "", hint)[:40]
    return base if len(base) >= 3 else f"user{base}"


async def create_external_user(*, session: AsyncSession, email: str, username_hint: str) -> User:
    """A new account without a password (it signs in through its provider). DuplicateUser: email taken."""
    base = _username_base(username_hint)
    for attempt in range(6):
        username = base if attempt == 0 else f"{base}-{secrets.token_hex(3)}"
        user = User(email=email, username=username, hashed_password=None)
        try:
            async with session.begin_nested():
                session.add(user)
                await session.flush()
        except IntegrityError:
            if await get_user_by_email(session=session, email=email) is not None:
                raise DuplicateUser from None
            continue  # the username is taken: another suffix
        add_event(
            session,
            USER_REGISTERED,
            {"user_id": str(user.id), "email": user.email, "username": user.username},
        )
        return user
    raise DuplicateUser
