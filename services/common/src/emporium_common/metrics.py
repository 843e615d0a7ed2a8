"""Prometheus RED metrics for HTTP, one access-log line per request, and the last-resort 500 handler.

Metric names are a contract with the dashboards (see services/common/README.md):
``emporium_http_requests_total{service,method,route,status}``,
``emporium_http_request_duration_seconds{service,method,route}`` (histogram),
``emporium_http_requests_in_progress{service,method}``.
``route`` is the route template (``/users/{id}``), never the raw path, so label cardinality stays bounded.
"""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

log = logging.getLogger("emporium.access")

REQUESTS = Counter(
    "emporium_http_requests_total",
    "HTTP requests handled, by route template and status code.",
    ["service", "method", "route", "status"],
)
DURATION = Histogram(
    "emporium_http_request_duration_seconds",
    "HTTP request latency in seconds, by route template.",
    ["service", "method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
IN_PROGRESS = Gauge(
    "emporium_http_requests_in_progress",
    "HTTP requests being handled right now.",
    ["service", "method"],
)

# Probes and scrapes would drown the real traffic in the access log (they are still counted).
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class MetricsMiddleware:
    """Counts and times every HTTP request; turns an unhandled exception into the standard 500 body."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        status = 500
        started = False
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        IN_PROGRESS.labels(self.service, method).inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error", extra={"method": method, "path": scope.get("path")})
            if started:  # too late for a clean error body; let the server close the connection
                raise
            status = 500
            await error_response(500, "Internal server error")(scope, receive, send)
        finally:
            elapsed = time.perf_counter() - start
            IN_PROGRESS.labels(self.service, method).dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(self.service, method, template, str(status)).inc()
            DURATION.labels(self.service, method, template).observe(elapsed)
            if scope.get("path") not in QUIET_PATHS:
                log.info(
                    "%s %s %s",
                    method,
                    scope.get("path"),
                    status,
                    extra={
                        "method": method,
                        "path": scope.get("path"),
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )


metrics_router = APIRouter(tags=["ops"])


@metrics_router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
