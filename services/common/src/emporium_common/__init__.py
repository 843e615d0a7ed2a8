"""Emporium's shared service library. See services/common/README.md."""

from .app import create_app
from .auth import CurrentPrincipal, Principal, TokenVerifier, get_principal, require_role
from .config import Settings
from .db import SessionDep, get_session
from .errors import AppError, ErrorResponse

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
