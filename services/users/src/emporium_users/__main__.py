"""``python -m emporium_users serve | migrate | create-admin | rotate-keys``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from pathlib import Path

from emporium_common.logging import configure_logging
from emporium_common.migrations import upgrade_head

from .config import UsersSettings
from .crud import DuplicateUser

ALEMBIC_INI = Path(os.environ.get("ALEMBIC_INI", Path(__file__).resolve().parents[2] / "alembic.ini"))


def serve(settings: UsersSettings) -> None:
    from emporium_common.app import serve as serve_app

    from .main import build_app

    serve_app(build_app(settings), settings)


def migrate(settings: UsersSettings) -> None:
    upgrade_head(ALEMBIC_INI, settings.database_url)


async def _create_admin(settings: UsersSettings, email: str, username: str, password: str) -> None:
    from emporium_common.db import create_engine, create_sessionmaker

    from . import crud
    from .models import UserCreate

    # Same validation as registration (email format, username and password length).
    user_in = UserCreate(email=email, username=username, password=password)
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            user = await crud.ensure_admin(
                session=session, email=user_in.email, username=user_in.username, password=user_in.password
            )
            print(f"admin ready: id={user.id} email={user.email}")
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emporium_users")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP server on $PORT (default 8000)")
    commands.add_parser("migrate", help="alembic upgrade head (run as its own step, before serve)")
    admin = commands.add_parser("create-admin", help="create the admin account or promote an existing one")
    admin.add_argument("--email", default=os.environ.get("ADMIN_EMAIL"))
    admin.add_argument("--username", default=os.environ.get("ADMIN_USERNAME", "admin"))
    admin.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    commands.add_parser("rotate-keys", help="previous <- current <- next <- new key, in JWT_KEYS_DIR")
    args = parser.parse_args(argv)

    settings = UsersSettings()
    configure_logging(settings.log_level, settings.service_name)
    if args.command == "serve":
        serve(settings)
    elif args.command == "migrate":
        migrate(settings)
    elif args.command == "create-admin":
        if not args.email:
            parser.error("--email (or ADMIN_EMAIL) is required")
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = os.environ.get("ADMIN_PASSWORD") or getpass.getpass("admin password: ")
        try:
            asyncio.run(_create_admin(settings, args.email, args.username, password))
        except (ValueError, DuplicateUser) as exc:  # invalid input (pydantic), or a taken username
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif args.command == "rotate-keys":
        from .keys import rotate_keys

        rotate_keys(settings.jwt_keys_dir)
        print(f"rotated keys in {settings.jwt_keys_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
