"""Emporium's shared service library. See services/common/README.md.

The names below are loaded on first use, so that ``import emporium_common.<module>`` (the migrations, the
command line) does not pull in FastAPI and the whole app.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .auth import CurrentPrincipal, Principal, TokenVerifier, get_principal, require_role
    from .config import Settings
    from .deps import SessionDep, get_session
    from .errors import AppError, ErrorResponse

_EXPORTS = {
    "AppError": "errors",
    "CurrentPrincipal": "auth",
    "ErrorResponse": "errors",
    "Principal": "auth",
    "SessionDep": "deps",
    "Settings": "config",
    "TokenVerifier": "auth",
    "create_app": "app",
    "get_principal": "auth",
    "get_session": "deps",
    "require_role": "auth",
}
__all__ = [
    "AppError",
    "CurrentPrincipal",
    "ErrorResponse",
    "Principal",
    "SessionDep",
    "Settings",
    "TokenVerifier",
    "create_app",
    "get_principal",
    "get_session",
    "require_role",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
