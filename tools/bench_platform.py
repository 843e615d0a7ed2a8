"""Benchmark of the local platform: time to ready for a cold and a warm `up`, the ingress's overhead
(latency through istiod-configured Envoy versus straight to the products service, measured side by side,
interleaved, in one run), the catalogue's throughput through the ingress at concurrency 8 (issue 12's
target: 3x the 368 req/s measured before, p99 <= 20 ms), and the storefront's catalog page (GET /,
server-rendered, through the ingress and straight to the storefront; target p50 <= 30 ms through the
ingress at concurrency 1).

    uv run python tools/bench_platform.py [--requests 400] [--throughput-requests 3000] [--root DIR]

Starts its own platform in a temporary root (or DIR) and stops it at the end; loopback only; bounded by
--requests and by a 30 s budget for the request phase, and by --throughput-requests per round (3 rounds,
15 s each at most) for the concurrency phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from emporium_testbed.httpload import Connection, run_phase
from emporium_testbed.ingress import GATEWAY_PORT

BASELINE_C8 = 368.0  # req/s, GET /products?limit=20 through the ingress at concurrency 8 (issue 12)
TARGET_P99_MS = 20.0


def platform(root: Path, command: str) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "emporium_testbed.platform", command, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise SystemExit(f"platform {command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def throughput(bases: dict[str, str], requests: int, rounds: int = 3) -> dict[str, list[dict]]:
    """GET /products?limit=20 at concurrency 8 and 1, through the ingress and direct, rounds interleaved."""

    async def get_page(connection: Connection) -> bool:
        return (await connection.request("GET", "/products?limit=20")).status == 200

    results: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for concurrency in (8, 1):
            for name, base in bases.items():
                count = requests if concurrency == 8 else requests // 4
                result = await run_phase(
                    name, get_page, lambda base=base: Connection(base), count, concurrency, 15
                )
                results.setdefault(f"{name} c{concurrency}", []).append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--throughput-requests", type=int, default=3000)
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="emporium-bench-"))
    root.chmod(0o755)
    cold = platform(root, "up")
    try:
        warm = platform(root, "up")
        ports = json.loads((root / "ports.json").read_text())
        targets = {
            "ingress": f"http://127.0.0.1:{GATEWAY_PORT}/products?limit=20",
            "direct": f"http://127.0.0.1:{ports['products/http']}/products?limit=20",
            "shop": f"http://127.0.0.1:{GATEWAY_PORT}/",
            "shop-direct": f"http://127.0.0.1:{ports['storefront/http']}/",
        }
        latencies: dict[str, list[float]] = {name: [] for name in targets}
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=10) as client:
            for url in targets.values():  # warm both paths (connections, caches)
                for _ in range(20):
                    client.get(url).raise_for_status()
            for _ in range(args.requests):
                if time.monotonic() > deadline:
                    break
                for name, url in targets.items():  # interleaved: both see the same machine load
                    started = time.perf_counter()
                    client.get(url).raise_for_status()
                    latencies[name].append((time.perf_counter() - started) * 1000)
        bases = {
            "ingress": f"http://127.0.0.1:{GATEWAY_PORT}",
            "direct": f"http://127.0.0.1:{ports['products/http']}",
        }
        rates = asyncio.run(throughput(bases, args.throughput_requests))
        load = os.getloadavg()[0]
    finally:
        platform(root, "down")

    print(f"local platform: cold up {cold:.0f} s, warm up (already running) {warm:.0f} s")
    print(f"GET /products?limit=20, {len(latencies['direct'])} requests each, interleaved, one client:")
    for name in ("ingress", "direct"):
        values = latencies[name]
        print(f"  {name:8} p50 {statistics.median(values):6.2f} ms   p99 {percentile(values, 0.99):6.2f} ms")
    ratio = statistics.median(latencies["ingress"]) / statistics.median(latencies["direct"])
    extra = statistics.median(latencies["ingress"]) - statistics.median(latencies["direct"])
    print(f"  ingress/direct p50 ratio {ratio:.2f} (+{extra:.2f} ms per request through the ingress)")
    print(
        f"GET /products?limit=20 throughput, 3 interleaved rounds (best shown; load average {load:.1f}),"
        " one keep-alive connection per worker:"
    )
    for name, rounds in rates.items():
        best = max(rounds, key=lambda r: r["rps"])
        each = ", ".join(str(r["rps"]) for r in rounds)
        errors = sum(r["errors"] for r in rounds)
        print(
            f"  {name:11} {best['rps']:7.1f} req/s   p50 {best['p50_ms']:6.2f} ms"
            f"   p99 {best['p99_ms']:6.2f} ms"
            f"   (rounds: {each} req/s; {errors} errors)"
        )
    best = max(rates["ingress c8"], key=lambda r: r["rps"])
    print(
        f"  target: ingress c8 >= {3 * BASELINE_C8:.0f} req/s (3x {BASELINE_C8:.0f}) with p99 <= "
        f"{TARGET_P99_MS:.0f} ms: {best['rps']:.0f} req/s ({best['rps'] / BASELINE_C8:.2f}x),"
        f" p99 {best['p99_ms']:.1f} ms"
    )
    print("storefront catalog page GET / (12 products, categories cached), same run, one client:")
    for name, label in (("shop", "ingress"), ("shop-direct", "direct")):
        values = latencies[name]
        print(f"  {label:8} p50 {statistics.median(values):6.2f} ms   p99 {percentile(values, 0.99):6.2f} ms")
    print(f"  target: p50 <= 30 ms through the ingress: {statistics.median(latencies['shop']):.2f} ms")


if __name__ == "__main__":
    main()
