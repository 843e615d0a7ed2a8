"""``python -m emporium_products serve|migrate``."""

from __future__ import annotations

import sys

from emporium_common.cli import service_main


def main(argv: list[str] | None = None) -> int:
    from .config import ProductsSettings

    return service_main(
        "emporium_products",
        __file__,
        ProductsSettings,
        "emporium_products.main:build_app",
        serve_help="run the HTTP API (PORT, default 8000)",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
