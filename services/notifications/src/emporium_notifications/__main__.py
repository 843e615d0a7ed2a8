"""``python -m emporium_notifications serve|migrate``."""

from __future__ import annotations

import sys

from emporium_common.cli import service_main


def main(argv: list[str] | None = None) -> int:
    from .config import NotificationsSettings

    return service_main(
        "emporium_notifications",
        __file__,
        NotificationsSettings,
        "emporium_notifications.main:build_app",
        serve_help="run the API, websocket, event consumer and mailer (PORT, default 8000)",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
