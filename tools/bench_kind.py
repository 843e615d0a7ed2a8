"""Benchmark: the same requests through the ingress of both platforms, in one run: `make up` (local processes,
istiod + upstream Envoy) and `make kind-up` (kind: pods with sidecars, the Istio gateway, kube-proxy).
GET /products?limit=20 and POST /orders, each at concurrency 1 and 8: throughput and p50/p99 latency.

    uv run python tools/bench_kind.py [--requests 200] [--budget 20] [--platforms local,kind]

Bounded: each cell sends at most --requests requests and stops after --budget seconds; loopback only. Starts
each platform itself, one after the other (both use port 8080), and stops it at the end. The kind cluster is
the one `make kind-up` makes; EMPORIUM_KIND_REUSE=1 measures an existing one and leaves it running.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
from emporium_testbed.ingress import GATEWAY_PORT
from emporium_testbed.kind import KindPlatform, kind_unavailable

GATEWAY = f"http://127.0.0.1:{GATEWAY_PORT}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.contextmanager
def local_platform():
    root = Path(tempfile.mkdtemp(prefix="emporium-bench-kind-"))
    root.chmod(0o755)

    def run(command: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "emporium_testbed.platform", command, "--root", str(root)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            raise SystemExit(f"platform {command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")

    run("up")
    try:
        yield dict(line.split("=", 1) for line in (root / "admin.env").read_text().split())
    finally:
        run("down")


@contextlib.contextmanager
def kind_platform():
    with KindPlatform() as cluster:
        yield cluster.admin_env()


def setup(admin: dict[str, str]) -> tuple[dict[str, str], str]:
    """A customer's headers and a product with enough stock for every order of the run."""
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:
        login = http.post(
            "/users/login", json={"email": admin["ADMIN_EMAIL"], "password": admin["ADMIN_PASSWORD"]}
        )
        login.raise_for_status()
        product = http.post(
            "/products",
            json={
                "name": "Bench",
                "price": "1.00",
                "stock_quantity": 1_000_000,
                "sku": f"B-{uuid.uuid4().hex[:8]}",
            },
            headers={"Authorization": f"Bearer {login.json()['access_token']}"},
        )
        product.raise_for_status()
        name = f"b{uuid.uuid4().hex[:10]}"
        body = {"email": f"{name}@example.com", "username": name, "password": "a long enough password"}
        http.post("/users/register", json=body).raise_for_status()
        token = http.post("/users/login", json={"email": body["email"], "password": body["password"]})
        token.raise_for_status()
        return {"Authorization": f"Bearer {token.json()['access_token']}"}, product.json()["id"]


def cell(request, concurrency: int, requests: int, budget: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    sent = iter(range(requests))
    deadline = time.monotonic() + budget

    def worker() -> None:
        nonlocal errors
        with httpx.Client(base_url=GATEWAY, timeout=30) as client:
            while time.monotonic() < deadline:
                with lock:
                    if next(sent, None) is None:
                        return
                started = time.perf_counter()
                ok = request(client)
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    errors += not ok

    for _ in range(3):  # warm up the connection pools and caches
        with httpx.Client(base_url=GATEWAY, timeout=30) as client:
            request(client)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall = time.monotonic() - started
    return {
        "n": len(latencies),
        "rps": len(latencies) / wall,
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "errors": errors,
    }


def measure(admin: dict[str, str], requests: int, budget: float) -> dict[tuple[str, int], dict[str, float]]:
    headers, product_id = setup(admin)
    order = {"items": [{"product_id": product_id, "quantity": 1}]}
    endpoints = {
        "GET /products?limit=20": lambda c: c.get("/products", params={"limit": 20}).status_code == 200,
        "POST /orders": lambda c: c.post("/orders", json=order, headers=headers).status_code == 201,
    }
    return {
        (name, concurrency): cell(request, concurrency, requests, budget)
        for name, request in endpoints.items()
        for concurrency in (1, 8)
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="per endpoint and concurrency")
    parser.add_argument("--budget", type=float, default=20, help="seconds per endpoint and concurrency")
    parser.add_argument("--platforms", default="local,kind")
    args = parser.parse_args()
    platforms = {"local": local_platform, "kind": kind_platform}
    results: dict[str, dict] = {}
    for name in args.platforms.split(","):
        if name == "kind" and (reason := kind_unavailable()):
            print(f"kind: skipped ({reason})")
            continue
        started = time.monotonic()
        with platforms[name]() as admin:
            print(f"{name}: up in {time.monotonic() - started:.0f} s", flush=True)
            results[name] = measure(admin, args.requests, args.budget)
    print(
        f"\nthrough the ingress {GATEWAY} (at most {args.requests} requests / {args.budget:.0f} s per cell)"
    )
    header = f"{'endpoint':<24}{'conc':>5}" + "".join(
        f"{name + ' req/s':>14}{'p50 ms':>9}{'p99 ms':>9}{'err':>5}" for name in results
    )
    print(header)
    for key in next(iter(results.values()), {}):
        row = f"{key[0]:<24}{key[1]:>5}"
        for name in results:
            r = results[name][key]
            row += f"{r['rps']:>14.1f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['errors']:>5}"
        print(row)


if __name__ == "__main__":
    main()
