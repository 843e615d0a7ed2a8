"""OpenTelemetry tracing, off by default (``OTEL_TRACES_EXPORTER=none``).

``console`` prints spans (debugging); ``otlp`` sends them over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``.
Incoming ``traceparent`` headers are honoured by the FastAPI instrumentation: spans join the caller's trace
(at the edge, the ingress gateway's Envoy starts it). Outgoing httpx calls carry the context on (the httpx
instrumentation), and events carry it through RabbitMQ in their message headers (emporium_common.events).
"""

from __future__ import annotations

import sys

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from .config import Settings

_provider: TracerProvider | None = None


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


def setup_tracing(app: FastAPI, settings: Settings) -> bool:
    """Instrument the app when an exporter is configured; returns whether tracing is on."""
    global _provider
    exporter = _exporter(settings)
    if exporter is None:
        return False
    if _provider is None:  # the global provider can be set once per process
        _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
        _provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(_provider)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    # One server span per request: no spans for each ASGI send/receive (they tripled the spans and the cost)
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_provider,
        excluded_urls="healthz,readyz,metrics",
        exclude_spans=["receive", "send"],
    )
    if not HTTPXClientInstrumentor().is_instrumented_by_opentelemetry:
        HTTPXClientInstrumentor().instrument(tracer_provider=_provider)
    return True
