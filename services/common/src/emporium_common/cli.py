"""The command line every service shares: ``python -m emporium_<svc> serve|migrate``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from .config import Settings


def alembic_ini_for(main_module_file: str) -> Path:
    """ALEMBIC_INI, else the source tree's (editable installs), else ./alembic.ini (the image's WORKDIR)."""
    if os.environ.get("ALEMBIC_INI"):
        return Path(os.environ["ALEMBIC_INI"])
    source = Path(main_module_file).resolve().parents[2] / "alembic.ini"
    return source if source.exists() else Path("alembic.ini").resolve()


def service_main(
    prog: str,
    main_module_file: str,
    settings_class: type[Settings],
    build_app: Callable[[Settings], FastAPI],
    serve_help: str = "run the HTTP API (HOST, PORT: default 0.0.0.0:8000)",
    argv: list[str] | None = None,
) -> None:
    """Parse argv and run ``serve`` (the app with uvicorn) or ``migrate`` (alembic upgrade head)."""
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help=serve_help)
    sub.add_parser("migrate", help="alembic upgrade head on DATABASE_URL")
    args = parser.parse_args(argv)
    if args.command == "migrate":
        from .migrations import upgrade_head

        upgrade_head(alembic_ini_for(main_module_file))
        return
    from .app import serve

    settings = settings_class()
    serve(build_app(settings), settings)
