"""What tracing costs: throughput of ``GET /products?limit=20`` on two products instances side by side, one
with tracing off (``OTEL_TRACES_EXPORTER=none``) and one exporting every span (OTLP/HTTP to the local
OpenTelemetry Collector, which forwards to Jaeger: the pipeline `make up` runs), plus a third that samples
10 % of new traces (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``): what sampling saves. Rounds alternate
which instance goes first, so machine noise hits all alike. Loopback only; bounded in requests and time.

    uv run python services/bench/bench_tracing.py [--requests 2000] [--rounds 6] [--concurrency 8]

Prints requests/s of each and the overhead (the issue's budget: at most 10 %), the server CPU milliseconds
per request of each and the overhead they imply (a CPU-bound server's throughput goes as their inverse; this
figure moves less with the machine's other load), and checks that the traced instance's spans did reach
Jaeger. Last, what one span costs in this process, apart from any server: CPU microseconds per request of
TracingMiddleware recording a span, and of the OTLP protobuf encoding the exporter does for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from bench_services import INTERNAL_TOKEN, serve_jwks, start_service
from emporium_common.migrations import upgrade_head
from emporium_common.testing import TokenFactory
from emporium_testbed.httpload import Connection, run_phase

SERVICES = Path(__file__).resolve().parents[1]


async def seed(url: str, tokens: TokenFactory, count: int) -> None:
    admin = tokens.auth_header("bench-admin", roles=["admin"])
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(count):
            body = {
                "name": f"Bench product {i}",
                "price": f"{(i * 37) % 9999 + 1}.00",
                "stock_quantity": 1000,
                "sku": f"TRACE-{uuid.uuid4().hex[:12]}",
                "category": f"cat-{i % 10}",
            }
            (await client.post(f"{url}/products", json=body, headers=admin)).raise_for_status()


async def measure(urls: dict[str, str], pids: dict[str, int], args) -> dict[str, dict]:
    totals = {name: {"requests": 0, "seconds": 0.0, "errors": 0, "cpu_seconds": 0.0} for name in urls}
    per_round = max(1, args.requests // args.rounds)

    async def list_products(connection: Connection) -> bool:
        return (await connection.request("GET", "/products?limit=20")).status == 200

    def connect(url: str):
        return lambda: Connection(url)

    for name, url in urls.items():  # warm both (connections, caches, the exporter's first batch)
        await run_phase(f"warm-up {name}", list_products, connect(url), 100, 4, 10)
    names = list(urls)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            result = await run_phase(
                name,
                list_products,
                connect(urls[name]),
                per_round,
                args.concurrency,
                args.max_seconds,
                cpu_pids={"server": pids[name]},
            )
            totals[name]["cpu_seconds"] += result["cpu_ms"].get("server", 0.0) * result["requests"] / 1000
            totals[name]["requests"] += result["requests"]
            totals[name]["seconds"] += result["seconds"]
            totals[name]["errors"] += result["errors"]
    for figures in totals.values():
        figures["rps"] = round(figures["requests"] / figures["seconds"], 1) if figures["seconds"] else 0.0
        requests = figures["requests"]
        figures["cpu_ms"] = figures["cpu_seconds"] * 1000 / requests if requests else 0.0
    return totals


def span_costs(requests: int = 5000, rounds: int = 5) -> dict[str, float]:
    """CPU microseconds per request (median of rounds, this process, export thread included) of
    TracingMiddleware around an app that answers at once: a span not sampled, recording the span (a
    BatchSpanProcessor whose exporter drops the batch), and encoding it as well (the OTLP/HTTP exporter's
    encoding, without the POST)."""
    from emporium_common.tracing import TracingMiddleware
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    class Drop(SpanExporter):
        def __init__(self, encode: bool) -> None:
            self.encode = encode

        def export(self, spans) -> SpanExportResult:
            if self.encode:
                encode_spans(spans).SerializePartialToString()
            return SpanExportResult.SUCCESS

    class Route:
        path = "/products"

    async def answer(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[]"})

    async def receive() -> dict:
        return {"type": "http.request"}

    async def send(message) -> None:
        pass

    headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    apps, providers = {"no span": answer}, []
    for name, sampler, encode in (
        ("span not sampled", ALWAYS_OFF, False),
        ("span recorded", ALWAYS_ON, False),
        ("recorded + encoded", ALWAYS_ON, True),
    ):
        provider = TracerProvider(sampler, Resource.create({SERVICE_NAME: "products-bench"}))
        provider.add_span_processor(BatchSpanProcessor(Drop(encode)))
        providers.append(provider)
        apps[name] = TracingMiddleware(answer, provider.get_tracer(__name__))

    async def run() -> dict[str, float]:
        costs: dict[str, list[float]] = {name: [] for name in apps}
        for _ in range(rounds):
            for name, app in apps.items():
                start = time.process_time()
                for _ in range(requests):
                    scope = {"type": "http", "method": "GET", "path": "/products", "headers": headers}
                    scope["route"] = Route
                    await app(scope, receive, send)
                for provider in providers:
                    provider.force_flush()
                costs[name].append((time.process_time() - start) * 1e6 / requests)
        return {name: sorted(values)[len(values) // 2] for name, values in costs.items()}

    try:
        return asyncio.run(run())
    finally:
        for provider in providers:
            provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per instance (cap)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=15.0, help="time cap per round and instance")
    args = parser.parse_args()

    from emporium_testbed.observability import LocalTracing
    from emporium_testbed.postgres import PostgresServer

    with tempfile.TemporaryDirectory(prefix="emporium-bench-tracing-") as tmp:
        tmp_path = Path(tmp)
        tmp_path.chmod(0o755)
        processes: list[subprocess.Popen] = []
        postgres = tracing = jwks_server = None
        try:
            postgres = PostgresServer(tmp_path / "postgres").start()
            db = f"bench_tracing_{uuid.uuid4().hex[:6]}"
            subprocess.run(
                ["psql", "-X", "-q", "-d", postgres.admin_dsn, "-c", f'CREATE DATABASE "{db}"'], check=True
            )
            dsn = postgres.admin_dsn.rsplit("/", 1)[0] + f"/{db}"
            upgrade_head(SERVICES / "products" / "alembic.ini", dsn)
            tracing = LocalTracing(tmp_path, tmp_path / "logs")
            tracing.start()
            tokens = TokenFactory()
            jwks_server, jwks_url = serve_jwks(tokens.jwks)
            base = {
                "DATABASE_URL": dsn,
                "JWKS_URL": jwks_url,
                "INTERNAL_TOKEN": INTERNAL_TOKEN,
                "AMQP_URL": "",
            }
            urls, pids = {}, {}
            for name, extra in (
                ("tracing off", {"OTEL_TRACES_EXPORTER": "none", "SERVICE_NAME": "products-untraced"}),
                (
                    "tracing on",
                    {
                        "OTEL_TRACES_EXPORTER": "otlp",
                        "OTEL_EXPORTER_OTLP_ENDPOINT": tracing.otlp_http,
                        "SERVICE_NAME": "products-traced",
                    },
                ),
                (
                    "10 % sampled",
                    {
                        "OTEL_TRACES_EXPORTER": "otlp",
                        "OTEL_EXPORTER_OTLP_ENDPOINT": tracing.otlp_http,
                        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                        "OTEL_TRACES_SAMPLER_ARG": "0.1",
                        "SERVICE_NAME": "products-sampled",
                    },
                ),
            ):
                process, url = start_service("products", {**base, **extra}, tmp_path)
                processes.append(process)
                urls[name], pids[name] = url, process.pid
            asyncio.run(seed(urls["tracing off"], tokens, args.products))
            totals = asyncio.run(measure(urls, pids, args))
            deadline = time.monotonic() + 30
            traced = False
            while time.monotonic() < deadline and not traced:
                services = httpx.get(f"{tracing.jaeger_url}/api/services", timeout=10).json()["data"] or []
                traced = "products-traced" in services
                time.sleep(1)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=15)
            if tracing:
                tracing.stop()
            if jwks_server:
                jwks_server.shutdown()
            if postgres:
                postgres.stop()
    off, on = totals["tracing off"], totals["tracing on"]
    overhead = 1 - on["rps"] / off["rps"] if off["rps"] else float("nan")
    print(f"GET /products?limit=20, {args.rounds} alternating rounds, concurrency {args.concurrency}:")
    for name, figures in totals.items():
        print(
            f"  {name:13} {figures['rps']:8.1f} req/s"
            f"  {figures['cpu_ms']:5.2f} server CPU-ms/request"
            f"  ({figures['requests']} requests, {figures['errors']} errors)"
        )
    print(f"  tracing overhead, every request traced: {overhead * 100:.1f} % of throughput (budget: 10 %)")
    sampled = totals["10 % sampled"]
    sampled_overhead = 1 - sampled["rps"] / off["rps"] if off["rps"] else float("nan")
    print(f"  tracing overhead, 10 % of new traces sampled: {sampled_overhead * 100:.1f} %")
    # Throughput of a CPU-bound server goes as 1/(CPU per request): this figure barely moves with the
    # machine's other load (the collector's and Jaeger's CPU is not in it: they run elsewhere in production)
    for name in ("tracing on", "10 % sampled"):
        cost = 1 - off["cpu_ms"] / totals[name]["cpu_ms"] if totals[name]["cpu_ms"] else float("nan")
        print(f"  tracing overhead by server CPU per request, {name}: {cost * 100:.1f} %")
    print(f"  spans of the traced instance in Jaeger: {'yes' if traced else 'NO'}")
    costs = span_costs()
    bare = costs.pop("no span")
    print("  one span in this process, CPU microseconds per request beyond the app's:")
    for name, cost in costs.items():
        print(f"    {name:19} {cost - bare:6.1f}")
    if not traced or off["errors"] or on["errors"] or sampled["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
