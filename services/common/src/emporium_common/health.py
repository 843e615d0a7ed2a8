"""Probes: ``/healthz`` (liveness: the process answers), ``/readyz`` and ``/health`` (readiness: every
dependency answers; 503 otherwise).

A readiness check is an async callable that raises when its dependency is not usable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

ReadinessCheck = Callable[[], Awaitable[None]]
CHECK_TIMEOUT_SECONDS = 3.0

log = logging.getLogger("emporium.health")


def amqp_check(url: str, timeout: float = CHECK_TIMEOUT_SECONDS) -> ReadinessCheck:
    """A readiness check that opens (and closes) a connection to the broker."""

    async def check() -> None:
        import aio_pika

        connection = await aio_pika.connect(url, timeout=timeout)
        await connection.close()

    return check


async def _run(name: str, check: ReadinessCheck) -> tuple[str, dict]:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
    except Exception as exc:  # any failure means "not ready"; say which kind, not the details
        log.warning("readiness check %s failed: %r", name, exc)
        return name, {"status": "down", "error": type(exc).__name__}
    return name, {"status": "up", "duration_ms": round((time.perf_counter() - start) * 1000, 1)}


async def run_checks(checks: Mapping[str, ReadinessCheck]) -> tuple[bool, dict[str, dict]]:
    results = dict(await asyncio.gather(*(_run(name, check) for name, check in checks.items())))
    return all(r["status"] == "up" for r in results.values()), results


health_router = APIRouter(tags=["ops"])


@health_router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    # Deliberately checks nothing external: a database outage must not get pods restarted.
    return {"status": "ok"}


@health_router.get("/readyz", summary="Readiness (503 when a dependency is down)")
async def readyz(request: Request) -> JSONResponse:
    ready, _ = await run_checks(request.app.state.readiness_checks)
    return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)


@health_router.get("/health", summary="Readiness summary per dependency")
async def health(request: Request) -> JSONResponse:
    ready, results = await run_checks(request.app.state.readiness_checks)
    body = {"status": "ready" if ready else "not ready", "service": request.app.title, "checks": results}
    return JSONResponse(body, status_code=200 if ready else 503)
