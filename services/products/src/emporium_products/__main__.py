"""``python -m emporium_products serve|migrate``."""

from __future__ import annotations

from emporium_common.cli import service_main


def main() -> None:
    from .config import ProductsSettings
    from .main import build_app

    service_main(
        "emporium_products",
        __file__,
        ProductsSettings,
        build_app,
        serve_help="run the HTTP API (PORT, default 8000)",
    )


if __name__ == "__main__":
    main()
