"""The app factory every service uses: routers in, a production-ready FastAPI app out.

Wires request ids, JSON logging, the error shape, Prometheus metrics (+ ``/metrics``), tracing (when
configured), ``/healthz``, ``/readyz`` and ``/health``, the database engine and the token verifier.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from .auth import TokenVerifier, verifier_from_settings
from .bodylimit import BodyLimitMiddleware
from .config import Settings
from .db import check_database, create_engine, create_sessionmaker
from .errors import ErrorResponse, install_error_handlers
from .health import ReadinessCheck, amqp_check, health_router
from .logging import configure_logging
from .metrics import MetricsMiddleware, metrics_router
from .request_id import RequestIdMiddleware
from .tracing import FASTAPI_TELEMETRY_OFF, setup_tracing

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def _operation_id(route: APIRoute) -> str:
    # Clean names for generated clients: "users-login" rather than "login_users_login_post".
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def create_app(
    settings: Settings,
    routers: Iterable[APIRouter] = (),
    *,
    title: str | None = None,
    version: str = "0.1.0",
    readiness_checks: Mapping[str, ReadinessCheck] | None = None,
    check_broker: bool = False,
    token_verifier: TokenVerifier | None = None,
    lifespan: Lifespan | None = None,
    body_limits: Mapping[str, int] | None = None,
    database: bool = True,
) -> FastAPI:
    """Build a service's app.

    - ``readiness_checks``: extra ``name -> async check`` for ``/readyz``; the database is always checked,
      and the broker too when ``check_broker`` is true and ``AMQP_URL`` is set.
    - ``token_verifier``: what ``CurrentPrincipal`` uses; defaults to one fetching ``JWKS_URL`` (if set).
    - ``lifespan``: the service's own startup/shutdown (consumers, ...), run inside the common one.
    - ``body_limits``: ``{"POST /users/login": 16384}``, bytes per route; other routes get
      ``settings.max_body_bytes``. Larger bodies are refused with 413 before they are read.
    - ``database``: false for a service without a database (the storefront): no engine, no check.
    The engine is on ``app.state.engine``, the session factory on ``app.state.sessionmaker``.
    """
    configure_logging(settings.log_level, settings.service_name)
    engine = create_engine(settings) if database else None

    @asynccontextmanager
    async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            if engine is not None:
                await engine.dispose()

    app = FastAPI(
        telemetry=FASTAPI_TELEMETRY_OFF,
        title=title or settings.service_name,
        version=version,
        lifespan=_lifespan,
        generate_unique_id_function=_operation_id,
        responses={500: {"model": ErrorResponse, "description": "Unexpected error"}},
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = create_sessionmaker(engine) if engine is not None else None
    app.state.token_verifier = token_verifier or verifier_from_settings(settings)

    checks: dict[str, ReadinessCheck] = {}
    if engine is not None:
        checks["database"] = lambda: check_database(engine)
    if check_broker and settings.amqp_url:
        checks["broker"] = amqp_check(settings.amqp_url)
    checks.update(readiness_checks or {})
    app.state.readiness_checks = checks

    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, default=settings.max_body_bytes, limits=body_limits)
    # Added last = outermost: the request id exists before metrics/logging/error handling run.
    app.add_middleware(MetricsMiddleware, service=settings.service_name)
    app.add_middleware(RequestIdMiddleware)
    setup_tracing(app, settings)  # last: its span is around everything else

    app.include_router(health_router)
    app.include_router(metrics_router)
    for router in routers:
        app.include_router(router)
    return app


def serve(app: FastAPI, settings: Settings, *, proxy_headers: bool = False) -> None:
    """Run app with uvicorn on settings.host:settings.port, logging through our JSON logging.

    proxy_headers: trust X-Forwarded-* from the peer (only behind a proxy that sets them).

    What the process has built so far (modules, the app, its routes and models: about 130 000 objects) lives
    as long as it does: frozen out of the garbage collector's sight (``gc.freeze``), a full collection no
    longer walks all of it. That was about 15 % of a cached catalogue page's CPU (services/bench/README.md).
    """
    import gc

    import uvicorn

    gc.collect()  # nothing already garbage is frozen
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        proxy_headers=proxy_headers,
        timeout_keep_alive=settings.keep_alive_seconds,
    )
