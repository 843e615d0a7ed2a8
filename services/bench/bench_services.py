# ruff: noqa: S311 - random picks load, not secrets
"""Benchmark one instance each of the products and orders services (loopback only, bounded).

    uv run python services/bench/bench_services.py [--requests 2000] [--orders 400] [--concurrency 8]

Starts a throwaway Postgres from the test bed (or uses BENCH_POSTGRES_DSN, a superuser postgresql:// URL
of an existing server), migrates the databases, serves a JWKS for test tokens, starts
``python -m emporium_products serve`` and ``python -m emporium_orders serve`` as separate processes on
127.0.0.1 (with ``--events``, the default: also a RabbitMQ node with the charts' topology, an SMTP sink
and ``python -m emporium_notifications serve``), seeds products, then measures:
- product listing: ``GET /products?limit=20`` (varying offsets, 30 % with a name filter)
- order placement: ``POST /orders`` (one line, server-side prices, stock reserved in products over HTTP)
- with ``--events``: order -> notification stored, from each 201 until the notifications service's
  ``pg_notify`` for that order (outbox relay -> RabbitMQ -> consumer -> notifications row)
and prints throughput and p50/p99 latency. Every phase is capped in request count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import httpx
from emporium_common.migrations import upgrade_head
from emporium_common.testing import TokenFactory
from emporium_testbed.httpload import Connection, cpu_line, percentile, run_phase
from emporium_testbed.process import free_port

SERVICES = Path(__file__).resolve().parents[1]
REPO = SERVICES.parent
INTERNAL_TOKEN = "bench-internal-token-0123456789"  # noqa: S105 - a throwaway local run


def serve_jwks(jwks: dict) -> tuple[http.server.ThreadingHTTPServer, str]:
    body = json.dumps(jwks).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"


def start_service(name: str, env: dict[str, str], log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (log_dir / f"{name}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", f"emporium_{name}", "serve"],
        env={**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "WARNING"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # a loaded shared machine imports slowly
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited; its log ends:\n{Path(log.name).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    tail = Path(log.name).read_text()[-2000:]
    raise RuntimeError(f"{name} did not start in time; its log ends:\n{tail}")


async def declare_topologies(rabbitmq) -> dict[str, str]:
    """The charts' topology files for orders and notifications on a vhost, as the operator declares them."""
    import secrets

    import yaml
    from emporium_operator.rabbit import RabbitAdmin, desired_topology, ensure_topology

    urls = {}
    async with RabbitAdmin(rabbitmq.management_url, rabbitmq.admin_user, rabbitmq.admin_password) as api:
        await api.put_vhost("emporium", "services benchmark")
        for service in ("orders", "notifications"):
            spec = yaml.safe_load((REPO / "charts" / service / "files" / "rabbit-topology.yaml").read_text())
            spec["vhost"] = "emporium"
            password = secrets.token_urlsafe(16)
            want = desired_topology(spec, service, password)
            await ensure_topology(api, want, {}, allow_queue_delete=False)
            urls[service] = rabbitmq.url_for(want.user, password, "emporium")
    return urls


async def listen_notifications(dsn: str, stored: dict[int, float]) -> object:
    """Record when each order's notification is stored (the service pg_notifies every stored row)."""
    import asyncpg

    connection = await asyncpg.connect(dsn)

    def on_notify(_conn, _pid, _channel, payload: str) -> None:
        order_id = json.loads(payload).get("order_id")
        if order_id is not None:
            stored.setdefault(int(order_id), time.perf_counter())

    await connection.add_listener("emporium_notifications", on_notify)
    return connection


async def benchmark(
    products_url: str,
    orders_url: str,
    tokens: TokenFactory,
    args,
    notifications_dsn: str | None = None,
    cpu_pids: dict[str, int] | None = None,
) -> list[dict]:
    admin = tokens.auth_header("bench-admin", roles=["admin"])
    async with httpx.AsyncClient(timeout=30) as client:
        product_ids = []
        for i in range(args.products):
            body = {
                "name": f"Bench product {i}",
                "price": f"{random.randint(100, 99999) / 100:.2f}",
                "stock_quantity": 1_000_000,
                "sku": f"BENCH-{uuid.uuid4().hex[:12]}",
                "category": f"cat-{i % 10}",
            }
            for _ in range(5):  # a 503 says "retry after": a loaded machine can be slow to answer at first
                response = await client.post(f"{products_url}/products", json=body, headers=admin)
                if response.status_code != 503:
                    break
                print(f"seeding: 503 {response.text[:200]}, retrying", file=sys.stderr)
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            response.raise_for_status()
            product_ids.append(response.json()["id"])

    async def list_products(connection: Connection) -> bool:
        offset = random.randint(0, max(0, args.products - 20))
        path = f"/products?limit=20&offset={offset}&sort_by=-price"
        if random.random() < 0.3:
            path += f"&name=product+{random.randint(1, 9)}"
        return (await connection.request("GET", path)).status == 200

    buyers = [tokens.auth_header(f"bench-buyer-{i}", email=f"buyer-{i}@example.com") for i in range(50)]
    placed: dict[int, float] = {}
    stored: dict[int, float] = {}

    async def place_order(connection: Connection) -> bool:
        body = {"items": [{"product_id": random.choice(product_ids), "quantity": 1}]}
        reply = await connection.request("POST", "/orders", json=body, headers=random.choice(buyers))
        if reply.status != 201:
            return False
        placed[reply.json()["id"]] = time.perf_counter()  # type: ignore[index]
        return True

    listener = await listen_notifications(notifications_dsn, stored) if notifications_dsn else None
    pids = cpu_pids or {}
    catalog_pids = {k: v for k, v in pids.items() if k in ("products", "postgres")}
    await run_phase("warm-up", list_products, lambda: Connection(products_url), 100, 4, 10)
    results = [
        await run_phase(
            "GET /products",
            list_products,
            lambda: Connection(products_url),
            args.requests,
            args.concurrency,
            args.max_seconds,
            catalog_pids,
        ),
    ]
    if args.orders:
        await run_phase("warm-up", place_order, lambda: Connection(orders_url), 20, 2, 10)
        placed.clear()
        results.append(
            await run_phase(
                "POST /orders",
                place_order,
                lambda: Connection(orders_url),
                args.orders,
                args.concurrency,
                args.max_seconds,
                pids,
            )
        )
    if listener is not None and args.orders:
        deadline = time.perf_counter() + 30
        # Polling a dict the listener fills: an Event per order would cost more than the wait.
        while len(stored.keys() & placed.keys()) < len(placed) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        delays = [stored[i] - t for i, t in placed.items() if i in stored]
        results.append(
            {
                "phase": "order->notif",
                "requests": len(placed),
                "errors": len(placed) - len(delays),
                "rps": "",
                "p50_ms": round(percentile(delays, 0.50) * 1000, 1) if delays else None,
                "p99_ms": round(percentile(delays, 0.99) * 1000, 1) if delays else None,
            }
        )
    if listener is not None:
        await listener.close()  # type: ignore[attr-defined]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="product listing requests (cap)")
    parser.add_argument("--orders", type=int, default=400, help="orders to place (cap)")
    parser.add_argument("--products", type=int, default=200, help="products to seed")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--events",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run RabbitMQ and the notifications service and measure order -> notification stored",
    )
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time cap per phase")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="emporium-bench-") as tmp:
        tmp_path = Path(tmp)
        tmp_path.chmod(0o755)
        postgres = None
        admin_dsn = os.environ.get("BENCH_POSTGRES_DSN")
        processes: list[subprocess.Popen] = []
        jwks_server = None
        rabbitmq = smtp = None
        try:
            if not admin_dsn:
                from emporium_testbed.postgres import PostgresServer

                postgres = PostgresServer(tmp_path / "postgres").start()
                admin_dsn = postgres.admin_dsn
            suffix = uuid.uuid4().hex[:6]
            dsns = {}
            names = ("products", "orders", "notifications") if args.events else ("products", "orders")
            for name in names:
                db = f"bench_{name}_{suffix}"
                subprocess.run(
                    ["psql", "-X", "-q", "-d", admin_dsn, "-c", f'CREATE DATABASE "{db}"'], check=True
                )
                dsns[name] = admin_dsn.rsplit("/", 1)[0] + f"/{db}"
                upgrade_head(SERVICES / name / "alembic.ini", dsns[name])

            tokens = TokenFactory()
            jwks_server, jwks_url = serve_jwks(tokens.jwks)
            common = {"JWKS_URL": jwks_url, "INTERNAL_TOKEN": INTERNAL_TOKEN, "AMQP_URL": ""}
            amqp: dict[str, str] = {}
            if args.events:
                from emporium_testbed.rabbitmq import RabbitMQServer
                from emporium_testbed.smtp import SMTPSink

                rabbitmq = RabbitMQServer(tmp_path / "rabbitmq").start(timeout=300)
                smtp = SMTPSink().start()
                amqp = asyncio.run(declare_topologies(rabbitmq))
                notifications, _ = start_service(
                    "notifications",
                    {
                        **common,
                        "DATABASE_URL": dsns["notifications"],
                        "AMQP_URL": amqp["notifications"],
                        "SMTP_HOST": smtp.host,
                        "SMTP_PORT": str(smtp.port),
                    },
                    tmp_path,
                )
                processes.append(notifications)
            products, products_url = start_service(
                "products", {**common, "DATABASE_URL": dsns["products"]}, tmp_path
            )
            processes.append(products)
            orders, orders_url = start_service(
                "orders",
                {
                    **common,
                    "DATABASE_URL": dsns["orders"],
                    "PRODUCTS_URL": products_url,
                    "AMQP_URL": amqp.get("orders", ""),
                },
                tmp_path,
            )
            processes.append(orders)

            cpu_pids = {"products": products.pid, "orders": orders.pid}
            if args.events:
                cpu_pids["notifications"] = notifications.pid
                cpu_pids["rabbitmq"] = rabbitmq.process.popen.pid  # type: ignore[union-attr]
            if postgres is not None:
                cpu_pids["postgres"] = postgres.process.popen.pid
            results = asyncio.run(
                benchmark(products_url, orders_url, tokens, args, dsns.get("notifications"), cpu_pids)
            )
            print(
                f"Emporium services benchmark (1 instance each, loopback, concurrency {args.concurrency}; "
                f"load average {os.getloadavg()[0]:.1f})"
            )
            print(f"{'phase':<16}{'requests':>9}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
            for r in results:
                print(
                    f"{r['phase']:<16}{r['requests']:>9}{r['errors']:>8}{r['rps']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}"
                )
            print("CPU per request (ms; the client is this process):")
            for r in results:
                if r.get("cpu_ms"):
                    print(f"  {r['phase']:<14}{cpu_line(r)}")
            if args.json:
                print(json.dumps(results))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
            if jwks_server is not None:
                jwks_server.shutdown()
            if smtp is not None:
                smtp.stop()
            if rabbitmq is not None:
                rabbitmq.stop()
            if postgres is not None:
                postgres.stop()


if __name__ == "__main__":
    main()
