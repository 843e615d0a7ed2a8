"""The storefront app: pages, assets, the live websocket; errors as pages a person can act on."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from urllib.parse import quote

import httpx
from emporium_common import create_app
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from . import admin, live, pages
from .config import StorefrontSettings
from .session import Sealer, SessionMiddleware
from .upstream import ApiError, Unavailable, Upstream
from .web import (
    HERE,
    AdminRequired,
    CsrfFailed,
    LoginRequired,
    SecurityHeadersMiddleware,
    redirect,
    render,
    session_of,
)

log = logging.getLogger("emporium.storefront")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one access line per page is enough
SERVICE_NAMES = {
    "users": "accounts",
    "products": "catalog",
    "orders": "orders",
    "notifications": "notifications",
}


def build_app(
    settings: StorefrontSettings | None = None, *, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    settings = settings or StorefrontSettings()
    upstream = Upstream(settings, transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await upstream.close()

    app = create_app(
        settings,
        [pages.router, admin.router, live.router],
        title="Emporium storefront",
        database=False,
        lifespan=lifespan,
    )
    # A shop, not an API: no OpenAPI pages.
    app.router.routes = [
        r
        for r in app.router.routes
        if getattr(r, "path", "") not in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
    ]
    app.openapi_url = None
    app.state.upstream = upstream
    app.state.categories = None
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(
        SessionMiddleware,
        sealer=Sealer(settings.session_key),
        secure=settings.secure_cookies,
        max_age=settings.session_max_age_seconds,
    )
    app.add_middleware(SecurityHeadersMiddleware, hsts=settings.secure_cookies)
    install_page_errors(app)
    return app


def install_page_errors(app: FastAPI) -> None:
    """Every failure is a page that says what to do next; never a stack trace or a blank page."""

    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith(("/healthz", "/readyz", "/health", "/metrics"))

    async def login_required(request: Request, exc: Exception) -> Response:
        # back to this page after signing in (a form's POST: back to the catalog)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return redirect("/login?next=" + quote(target if request.method == "GET" else "/", safe="/"))

    async def admin_required(request: Request, exc: Exception) -> Response:
        return render(
            request,
            "error.html",
            403,
            title="For administrators only",
            message="This page is part of the shop's administration. Sign in with an administrator account.",
        )

    async def csrf_failed(request: Request, exc: Exception) -> Response:
        return render(
            request,
            "error.html",
            403,
            title="This form has expired",
            message="For your security the form could not be sent. Go back, reload the page and try again.",
        )

    async def unavailable(request: Request, exc: Unavailable) -> Response:
        name = SERVICE_NAMES.get(exc.service, exc.service)
        response = render(
            request,
            "error.html",
            503,
            title="Temporarily unavailable",
            message=f"The shop's {name} service is not answering right now. "
            "Please try again in a moment; nothing was lost.",
        )
        response.headers["Retry-After"] = "5"
        return response

    async def api_error(request: Request, exc: ApiError) -> Response:
        if exc.status == 401:
            session_of(request).sign_out()
            session_of(request).flash("Your session has expired. Please sign in again.", "warning")
            return await login_required(request, exc)
        status = exc.status if 400 <= exc.status < 500 else 502
        return render(
            request,
            "error.html",
            status,
            title="Something went wrong",
            message=f"The shop could not do that: {exc.message}.",
        )

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if not wants_html(request):
            return Response(status_code=exc.status_code)
        titles = {404: "Page not found", 405: "Not allowed"}
        messages = {
            404: "There is no page at this address. The catalog is a good place to start.",
            405: "This address does not take that kind of request. Use the links and buttons of the shop.",
        }
        return render(
            request,
            "error.html",
            exc.status_code,
            title=titles.get(exc.status_code, "Something went wrong"),
            message=messages.get(exc.status_code, str(exc.detail)),
        )

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return render(
            request,
            "error.html",
            404 if request.method == "GET" else 400,
            title="Page not found" if request.method == "GET" else "Invalid request",
            message="That address or form is not one the shop knows. The catalog is a good place to start.",
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path, "method": request.method})
        return render(
            request,
            "error.html",
            500,
            title="Something went wrong on our side",
            message="We are sorry: the page could not be shown. Please try again; if it keeps happening, "
            "try again later.",
        )

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(AdminRequired, admin_required)
    app.add_exception_handler(CsrfFailed, csrf_failed)
    app.add_exception_handler(Unavailable, unavailable)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
