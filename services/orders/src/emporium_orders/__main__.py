"""``python -m emporium_orders serve|migrate``."""

from __future__ import annotations

from emporium_common.cli import service_main


def main() -> None:
    from .config import OrdersSettings
    from .main import build_app

    service_main(
        "emporium_orders",
        __file__,
        OrdersSettings,
        build_app,
        serve_help="run the HTTP API and the outbox relay (PORT, default 8000)",
    )


if __name__ == "__main__":
    main()
