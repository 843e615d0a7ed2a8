"""``python -m emporium_orders serve|migrate``."""

from __future__ import annotations

import sys

from emporium_common.cli import service_main


def main(argv: list[str] | None = None) -> int:
    from .config import OrdersSettings

    return service_main(
        "emporium_orders",
        __file__,
        OrdersSettings,
        "emporium_orders.main:build_app",
        serve_help="run the HTTP API and the outbox relay (PORT, default 8000)",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
