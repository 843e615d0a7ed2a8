"""``python -m emporium_notifications serve|migrate``."""

from __future__ import annotations

from emporium_common.cli import service_main


def main() -> None:
    from .config import NotificationsSettings
    from .main import build_app

    service_main(
        "emporium_notifications",
        __file__,
        NotificationsSettings,
        build_app,
        serve_help="run the API, websocket, event consumer and mailer (PORT, default 8000)",
    )


if __name__ == "__main__":
    main()
