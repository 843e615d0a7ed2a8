"""Prometheus metrics (served on METRICS_PORT, default 9090). Names are a contract with the dashboards."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILE_TOTAL = Counter(
    "emporium_operator_reconcile_total",
    "Reconciles by kind and result (ok, not_ready, invalid, conflict, error)",
    ["kind", "result"],
)
RECONCILE_DURATION = Histogram(
    "emporium_operator_reconcile_duration_seconds",
    "Reconcile duration by kind",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "emporium_operator_reconcile_errors_total",
    "Failed reconciles by kind and reason (the Ready reason)",
    ["kind", "reason"],
)
DRIFT_REPAIRS = Counter(
    "emporium_operator_drift_repairs_total",
    "Out-of-band changes repaired by the drift check, by kind and object (database, role, queue, ...)",
    ["kind", "object"],
)

OBJECTS = Gauge("emporium_operator_objects", "Objects the operator watches, by kind", ["kind"])
PENDING = Gauge(
    "emporium_operator_reconciles_pending",
    "Reconciles due now, queued or running (0 when the operator has caught up; drift checks not yet due "
    "are not counted)",
)

_started_port: int | None = None


def serve() -> int | None:
    """Start the metrics endpoint once per process; METRICS_PORT=0 disables it."""
    global _started_port
    port = int(os.environ.get("METRICS_PORT", "9090"))
    if port == 0 or _started_port is not None:
        return _started_port
    start_http_server(port, addr=os.environ.get("METRICS_ADDR", "0.0.0.0"))  # noqa: S104 - scraped in-cluster
    _started_port = port
    return port


@contextmanager
def timed(kind: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        RECONCILE_DURATION.labels(kind=kind).observe(time.perf_counter() - start)
