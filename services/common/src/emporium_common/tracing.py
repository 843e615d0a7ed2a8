"""OpenTelemetry tracing, off by default (``OTEL_TRACES_EXPORTER=none``).

``console`` prints spans (debugging); ``otlp`` sends them over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``.
The server span of each request is FastAPI's own instrumentation (``FastAPI(telemetry=...)``, see
``telemetry_config``): incoming ``traceparent`` headers are honoured, so spans join the caller's trace (at the
edge, the ingress gateway's Envoy starts it). Outgoing httpx calls carry the context on (the httpx
instrumentation), and events carry it through RabbitMQ in their message headers (emporium_common.events).
Sampling follows ``OTEL_TRACES_SAMPLER`` (default ``parentbased_always_on``: a request is traced when its
caller's is, and every new trace is).
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import Any

from fastapi.telemetry import TelemetryConfig
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from .config import Settings
from .metrics import QUIET_PATHS

_provider: TracerProvider | None = None

# Tracing off: FastAPI's instrumentation stays off even if something else sets a global tracer provider.
TRACING_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


class _Stdout:
    """sys.stdout as it is at write time (test runners swap it; the exporter outlives any one of them)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


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


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in QUIET_PATHS  # probes and scrapes


def telemetry_config(settings: Settings) -> TelemetryConfig:
    """What to pass as ``FastAPI(telemetry=...)``: one server span per request when an exporter is configured.

    Only the span: FastAPI's HTTP metrics are off (MetricsMiddleware records ours; no meter provider is
    configured), and so are its spans for dependency resolution, endpoint and serialization. This replaced
    opentelemetry-instrumentation-fastapi, which cost every request far more than its span, sampled or not:
    it matched the path against every route again, collected the request's attributes and recorded its
    (unexported) metrics before the sampler had a say.
    """
    global _provider
    exporter = _exporter(settings)
    if exporter is None:
        return TRACING_OFF
    if _provider is None:  # the global provider can be set once per process
        _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
        _provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(_provider)
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    if not HTTPXClientInstrumentor().is_instrumented_by_opentelemetry:
        HTTPXClientInstrumentor().instrument(tracer_provider=_provider)
    return {
        "tracer_provider": _provider,
        "tracing": True,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
        "exclude": _untraced,
    }
