"""JSON log lines carry the request id (and the trace id once tracing is on)."""

import json

import pytest
from emporium_common import Settings, create_app, testing, tracing
from fastapi import APIRouter, FastAPI
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

router = APIRouter()


@router.get("/hello/{name}")
async def hello(name: str) -> dict:
    return {"hello": name}


@router.get("/boom")
async def boom() -> dict:
    raise RuntimeError("boom")


def _console_spans(text: str) -> list[dict]:
    """The spans ConsoleSpanExporter printed (indented JSON objects between the JSON log lines)."""
    decoder, spans, index = json.JSONDecoder(), [], 0
    while (index := text.find("{\n", index)) != -1:
        try:
            value, index = decoder.raw_decode(text, index)
        except ValueError:
            index += 1
            continue
        if isinstance(value, dict) and "context" in value:
            spans.append(value)
    return spans


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


async def test_access_log_is_json_with_request_id(common_database_url, capsys):
    app = create_app(Settings(service_name="logdemo", database_url=common_database_url), [router])
    async with testing.app_client(app) as client:
        await client.get("/hello/ada", headers={"X-Request-ID": "req-42"})
        await client.get("/healthz")  # probes are not logged
    lines = [e for e in _json_lines(capsys.readouterr().out) if e.get("logger") == "emporium.access"]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["request_id"] == "req-42"
    assert entry["service"] == "logdemo"
    assert entry["route"] == "/hello/{name}" and entry["status"] == 200 and entry["level"] == "INFO"
    assert entry["duration_ms"] >= 0


def test_tracing_is_off_by_default(common_database_url):
    app = FastAPI()
    assert not tracing.setup_tracing(app, Settings(database_url=common_database_url))
    assert not app.user_middleware


@pytest.fixture
def httpx_uninstrumented_after():
    """setup_tracing instruments httpx for the whole process: undo it, or every later test's httpx requests
    would carry this test's traceparent and print console spans."""
    yield
    HTTPXClientInstrumentor().uninstrument()


async def test_console_tracing_adds_trace_ids_to_logs(
    common_database_url, capsys, httpx_uninstrumented_after
):
    settings = Settings(
        service_name="tracedemo", database_url=common_database_url, otel_traces_exporter="console"
    )
    app = create_app(settings, [router])
    async with testing.app_client(app) as client:
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        response = await client.get("/hello/ada", headers={"traceparent": traceparent})
        assert response.status_code == 200
        assert (await client.get("/healthz", headers={"traceparent": traceparent})).status_code == 200
        assert (await client.get("/boom")).status_code == 500
        # The caller (the gateway, sampling a share of new traces) did not sample this one: no span
        unsampled = "00-1bf7651916cd43dd8448eb211c80319c-c7ad6b7169203331-00"
        assert (await client.get("/hello/bob", headers={"traceparent": unsampled})).status_code == 200
    assert tracing._provider is not None
    tracing._provider.force_flush()
    out = capsys.readouterr().out
    lines = [e for e in _json_lines(out) if e.get("logger") == "emporium.access"]
    # The incoming trace is continued, so logs and spans join the caller's trace.
    assert lines and lines[0]["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    spans = [s for s in _console_spans(out) if s["resource"]["attributes"].get("service.name") == "tracedemo"]
    # ... but its log lines still carry its trace id (to find its other services' lines)
    (bob,) = [e for e in lines if e["path"] == "/hello/bob"]
    assert bob["trace_id"] == "1bf7651916cd43dd8448eb211c80319c"
    # One server span per request, none for the probe: no spans for dependencies, endpoint, serialization;
    # none for the unsampled request.
    assert sorted(s["name"] for s in spans) == ["GET /boom", "GET /hello/{name}"], spans
    span = next(s for s in spans if s["name"] == "GET /hello/{name}")
    assert span["status"]["status_code"] == "UNSET"
    assert span["kind"] == "SpanKind.SERVER"
    assert span["context"]["trace_id"] == "0x0af7651916cd43dd8448eb211c80319c"
    assert span["parent_id"] == "0xb7ad6b7169203331"
    assert span["context"]["span_id"] == "0x" + lines[0]["span_id"]
    attributes = span["attributes"]
    assert attributes["http.route"] == "/hello/{name}" and attributes["http.response.status_code"] == 200
    assert attributes["http.request.method"] == "GET" and attributes["url.path"] == "/hello/ada"
    # A request without traceparent starts a trace; an unhandled error is the span's error status.
    failed = next(s for s in spans if s["name"] == "GET /boom")
    assert failed["parent_id"] is None and failed["context"]["trace_id"] != span["context"]["trace_id"]
    assert failed["status"]["status_code"] == "ERROR"
    assert failed["attributes"]["http.response.status_code"] == 500
