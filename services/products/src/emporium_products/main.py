"""The products service app."""

from __future__ import annotations

from emporium_common import TokenVerifier, create_app
from fastapi import FastAPI

from .config import ProductsSettings
from .routes import internal_router, router


def build_app(
    settings: ProductsSettings | None = None, *, token_verifier: TokenVerifier | None = None
) -> FastAPI:
    settings = settings or ProductsSettings()
    app = create_app(
        settings, [router, internal_router], title="Emporium products", token_verifier=token_verifier
    )
    return app
