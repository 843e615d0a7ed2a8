"""OpenTelemetry tracing, off by default (``OTEL_TRACES_EXPORTER=none``).

``console`` prints spans (debugging); ``otlp`` sends them over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``.
Each request is one server span (``TracingMiddleware``) that continues the caller's trace from its
``traceparent`` header (at the edge, the ingress gateway's Envoy starts it). Outgoing httpx calls carry the
context on (the httpx instrumentation), and events carry it through RabbitMQ in their message headers
(emporium_common.events). Sampling follows ``OTEL_TRACES_SAMPLER`` (default ``parentbased_always_on``: a
request is traced when its caller's is, and every new trace is).
"""

from __future__ import annotations

import sys

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .metrics import QUIET_PATHS

_provider: TracerProvider | None = None

# FastAPI's own instrumentation stays off (TracingMiddleware is ours), even with a global tracer provider.
FASTAPI_TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}

_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
_PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


class _Stdout:
    """sys.stdout as it is at write time (test runners swap it; the exporter outlives any one of them)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


class TracingMiddleware:
    """One server span per HTTP request or websocket (not for probes and scrapes), current while the app runs,
    so log lines and outgoing calls carry its ids.

    Ours rather than opentelemetry-instrumentation-fastapi or FastAPI's own telemetry: both did per-request
    work the span does not need, sampled or not (matching the path against every route again, request
    attribute sets, headers parsed into objects, HTTP metrics through an unset meter provider), and cost a
    cached catalogue page several times what the span itself costs. Attributes (stable HTTP conventions):
    ``http.request.method``, ``url.path``, ``http.route``, ``http.response.status_code``; 5xx and
    exceptions set the span's status to error.
    """

    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _PROPAGATION_HEADERS
        }
        parent = propagate.extract(carrier)  # a fresh context: never the server's or a test client's
        method = scope.get("method", "GET") if kind == "http" else "GET"
        if method not in _METHODS:
            method = "_OTHER"
        span = self.tracer.start_span(
            "HTTP" if method == "_OTHER" else method,
            parent,
            trace.SpanKind.SERVER,
            {"http.request.method": method, "url.path": scope["path"]},
        )
        token = context.attach(trace.set_span_in_context(span, parent))
        status: int | None = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status if kind == "http" else send)
        except BaseException as exc:
            if span.is_recording():
                span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
            raise
        finally:
            if span.is_recording():
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.set_attribute("http.route", route)
                    span.update_name(route if kind == "websocket" else f"{span.name} {route}")
                if status is not None:
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.StatusCode.ERROR)
            context.detach(token)
            span.end()


def _exporter(settings: Settings) -> SpanExporter | None:
    if settings.otel_traces_exporter == "console":
        return ConsoleSpanExporter(out=_Stdout())
    if settings.otel_traces_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otel_exporter_otlp_endpoint
        if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return OTLPSpanExporter(endpoint=endpoint)
    return None


def setup_tracing(app: FastAPI, settings: Settings) -> bool:
    """Trace the app's requests when an exporter is configured; returns whether tracing is on.

    Call it after adding the app's other middleware: the span is then the outermost, around them all.
    """
    global _provider
    exporter = _exporter(settings)
    if exporter is None:
        return False
    if _provider is None:  # the global provider can be set once per process
        _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
        _provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(_provider)
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    app.add_middleware(TracingMiddleware, tracer=_provider.get_tracer(__name__))
    if not HTTPXClientInstrumentor().is_instrumented_by_opentelemetry:
        HTTPXClientInstrumentor().instrument(tracer_provider=_provider)
    return True
