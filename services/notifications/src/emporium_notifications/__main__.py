"""``python -m emporium_notifications serve|migrate``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def alembic_ini() -> Path:
    """ALEMBIC_INI, else the source tree's (editable installs), else ./alembic.ini (the image's WORKDIR)."""
    if os.environ.get("ALEMBIC_INI"):
        return Path(os.environ["ALEMBIC_INI"])
    source = Path(__file__).resolve().parents[2] / "alembic.ini"
    return source if source.exists() else Path("alembic.ini").resolve()


def main() -> None:
    parser = argparse.ArgumentParser(prog="emporium_notifications")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the API, websocket, event consumer and mailer (PORT, default 8000)")
    sub.add_parser("migrate", help="alembic upgrade head on DATABASE_URL")
    args = parser.parse_args()
    if args.command == "migrate":
        from emporium_common.migrations import upgrade_head

        upgrade_head(alembic_ini())
        return
    from emporium_common.app import serve

    from .config import NotificationsSettings
    from .main import build_app

    settings = NotificationsSettings()
    serve(build_app(settings), settings)


if __name__ == "__main__":
    main()
