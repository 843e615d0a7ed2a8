"""Typed dependencies for the routes."""

from __future__ import annotations

from typing import Annotated

from emporium_common import CurrentPrincipal, SessionDep
from emporium_common.auth import unauthorized
from fastapi import Depends, Request

from . import crud
from .config import UsersSettings
from .keys import KeyRing
from .models import User


def get_settings(request: Request) -> UsersSettings:
    return request.app.state.settings


def get_keys(request: Request) -> KeyRing:
    return request.app.state.keys


SettingsDep = Annotated[UsersSettings, Depends(get_settings)]
KeysDep = Annotated[KeyRing, Depends(get_keys)]


async def get_current_user(principal: CurrentPrincipal, session: SessionDep) -> User:
    """The caller's account: a valid token is not enough, the account must still exist and be active."""
    try:
        user_id = int(principal.sub)
    except ValueError:
        raise unauthorized() from None
    if not 0 < user_id < 2**31:  # the id column is an int4; anything else cannot be one of ours
        raise unauthorized()
    user = await crud.get_user(session=session, user_id=user_id)
    if user is None or not user.is_active:
        raise unauthorized()
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def client_address(request: Request, settings: SettingsDep) -> str:
    """The caller's address for throttling: the socket peer, or the address our trusted proxies saw."""
    peer = request.client.host if request.client else "unknown"
    hops = settings.trusted_proxy_hops
    if hops:
        forwarded = [a.strip() for a in request.headers.get("x-forwarded-for", "").split(",") if a.strip()]
        # Each proxy appends the address it received from: the entry `hops` from the right is the one
        # written by our outermost proxy; anything left of it is client-controlled.
        if len(forwarded) >= hops:
            return forwarded[-hops][:64]
    return peer[:64]


ClientAddress = Annotated[str, Depends(client_address)]
