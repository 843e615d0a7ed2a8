"""Plain data-access functions (keyword-only arguments, one session passed in)."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta

from emporium_common.events import USER_REGISTERED
from emporium_common.outbox import add_event
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession

from .models import LoginAttempt, RefreshToken, Role, User, UserCreate
from .security import hash_password, hash_refresh_token, new_refresh_token


class DuplicateUser(Exception):
    """The email or the username is taken (deliberately not saying which)."""


async def create_user(*, session: AsyncSession, user_create: UserCreate, role: Role = Role.customer) -> User:
    hashed_password = await asyncio.to_thread(hash_password, user_create.password)  # CPU-bound: off the loop
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


async def count_recent_attempts(
    *, session: AsyncSession, window: timedelta, email: str | None = None, address: str | None = None
) -> int:
    query = select(func.count()).select_from(LoginAttempt)
    query = query.where(LoginAttempt.attempted_at > datetime.now(UTC) - window)
    if email is not None:
        query = query.where(LoginAttempt.email == email, LoginAttempt.succeeded.is_(False))
    if address is not None:
        query = query.where(LoginAttempt.client_address == address)
    return (await session.exec(query)).scalar_one()


async def record_attempt(*, session: AsyncSession, email: str, address: str, succeeded: bool) -> None:
    session.add(LoginAttempt(email=email, client_address=address, succeeded=succeeded))
    if random.random() < 0.01:  # noqa: S311 - housekeeping now and then, not security
        cutoff = datetime.now(UTC) - timedelta(days=1)
        await session.exec(delete(LoginAttempt).where(LoginAttempt.attempted_at < cutoff))
