"""``python -m emporium_users serve | migrate | create-admin | rotate-keys``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys

from emporium_common.cli import Command, service_main

from .config import UsersSettings


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


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--email", default=os.environ.get("ADMIN_EMAIL"))
    parser.add_argument("--username", default=os.environ.get("ADMIN_USERNAME", "admin"))
    parser.add_argument("--password-stdin", action="store_true", help="read the password from stdin")


def create_admin(args: argparse.Namespace, settings: UsersSettings) -> int:
    from .crud import DuplicateUser

    if not args.email:
        print("error: --email (or ADMIN_EMAIL) is required", file=sys.stderr)
        return 2
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = os.environ.get("ADMIN_PASSWORD") or getpass.getpass("admin password: ")
    try:
        asyncio.run(_create_admin(settings, args.email, args.username, password))
    except (ValueError, DuplicateUser) as exc:  # invalid input (pydantic), or a taken username
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def rotate_keys(args: argparse.Namespace, settings: UsersSettings) -> int:
    from .keys import rotate_keys as rotate

    rotate(settings.jwt_keys_dir)
    print(f"rotated keys in {settings.jwt_keys_dir}")
    return 0


COMMANDS = {
    "create-admin": Command(
        "create the admin account or promote an existing one", create_admin, _admin_arguments
    ),
    "rotate-keys": Command("previous <- current <- next <- new key, in JWT_KEYS_DIR", rotate_keys),
}


def main(argv: list[str] | None = None) -> int:
    return service_main(
        "emporium_users",
        __file__,
        UsersSettings,
        "emporium_users.main:build_app",
        serve_help="run the HTTP server on $PORT (default 8000)",
        commands=COMMANDS,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
