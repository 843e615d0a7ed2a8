"""``python -m emporium_storefront serve`` (``migrate`` is a no-op: the storefront has no database)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["migrate"]:
        sys.stdout.write("emporium_storefront has no database: nothing to migrate\n")
        return 0
    from emporium_common.cli import service_main

    from .config import StorefrontSettings

    return service_main(
        "emporium_storefront",
        __file__,
        StorefrontSettings,
        "emporium_storefront.main:build_app",
        serve_help="serve the shop's pages (HOST, PORT: default 0.0.0.0:8000)",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
