"""Development only: ``serve`` with RELOAD_DIR set (skaffold dev on kind: the charts' devReload, where
skaffold syncs saved .py files into /app/dev) runs uvicorn with reload. Production refuses RELOAD_DIR."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .cli import load_app_factory
from .logging import configure_logging

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .config import Settings

FACTORY_ENV = "EMPORIUM_RELOAD_APP_FACTORY"
LOGGING_ENV = "EMPORIUM_RELOAD_LOGGING"


def serve_reloading(app_factory: str, settings: Settings) -> None:
    """uvicorn serves the app of ``app_factory`` (``module:function``, called without arguments: the service's
    settings come from the environment) from a worker process it restarts whenever a .py file under
    settings.reload_dir changes. The worker is a new interpreter: it finds the factory and the logging set-up
    in the environment (reloading_app)."""
    import uvicorn

    os.environ[FACTORY_ENV] = app_factory
    os.environ[LOGGING_ENV] = f"{settings.log_level}:{settings.service_name}"
    uvicorn.run(
        "emporium_common.reload:reloading_app",
        factory=True,
        reload=True,
        reload_dirs=[settings.reload_dir or "."],
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_keep_alive=settings.keep_alive_seconds,
    )


def reloading_app() -> FastAPI:
    """The app in serve_reloading's worker process: our JSON logging, then the service's factory."""
    level, _, service = os.environ[LOGGING_ENV].partition(":")
    configure_logging(level, service)
    return load_app_factory(os.environ[FACTORY_ENV])()  # the factory reads settings from the environment
