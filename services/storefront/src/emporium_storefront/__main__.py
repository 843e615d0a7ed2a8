"""``python -m emporium_storefront serve`` (``migrate`` is a no-op: the storefront has no database)."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["migrate"]:
        sys.stdout.write("emporium_storefront has no database: nothing to migrate\n")
        return
    from emporium_common.cli import service_main

    from .config import StorefrontSettings
    from .main import build_app

    service_main(
        "emporium_storefront",
        __file__,
        StorefrontSettings,
        build_app,
        serve_help="serve the shop's pages (HOST, PORT: default 0.0.0.0:8000)",
    )


if __name__ == "__main__":
    main()
