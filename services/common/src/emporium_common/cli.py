"""The command line every service shares: ``python -m emporium_<svc> serve|migrate [|<extra commands>]``.

``migrate`` imports neither FastAPI nor the service's app: migrations run on the critical path of every start
(a Job before the pods, a step of ``make up``), so they load only Alembic, SQLAlchemy and the models.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Settings
from .logging import configure_logging

if TYPE_CHECKING:
    from fastapi import FastAPI


@dataclass(frozen=True)
class Command:
    """A service's own subcommand: ``run(args, settings)`` returns the exit status (None means 0)."""

    help: str
    run: Callable[[argparse.Namespace, Settings], int | None]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


def alembic_ini_for(main_module_file: str) -> Path:
    """ALEMBIC_INI, else the source tree's (editable installs), else ./alembic.ini (the image's WORKDIR)."""
    if os.environ.get("ALEMBIC_INI"):
        return Path(os.environ["ALEMBIC_INI"])
    source = Path(main_module_file).resolve().parents[2] / "alembic.ini"
    return source if source.exists() else Path("alembic.ini").resolve()


def load_app_factory(app_factory: str) -> Callable[[Settings], FastAPI]:
    module, _, name = app_factory.partition(":")
    return getattr(import_module(module), name)


def service_main(
    prog: str,
    main_module_file: str,
    settings_class: type[Settings],
    app_factory: str,
    serve_help: str = "run the HTTP API (HOST, PORT: default 0.0.0.0:8000)",
    commands: dict[str, Command] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Parse argv and run ``serve`` (the app ``module:function`` with uvicorn), ``migrate`` (alembic upgrade
    head on DATABASE_URL) or one of the service's own ``commands``. Returns the exit status."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help=serve_help)
    sub.add_parser("migrate", help="alembic upgrade head on DATABASE_URL (its own step, before serve)")
    for name, command in (commands or {}).items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    args = parser.parse_args(argv)

    settings = settings_class()
    configure_logging(settings.log_level, settings.service_name)
    if args.command == "migrate":
        from .migrations import upgrade_head

        upgrade_head(alembic_ini_for(main_module_file), settings.database_url)
        return 0
    if args.command == "serve":
        if settings.reload_dir:  # development only (production refuses RELOAD_DIR)
            from .reload import serve_reloading

            serve_reloading(app_factory, settings)
            return 0
        from .app import serve

        serve(load_app_factory(app_factory)(settings), settings)
        return 0
    return (commands or {})[args.command].run(args, settings) or 0
