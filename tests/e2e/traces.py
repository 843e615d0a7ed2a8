"""One order's trace in Jaeger, from the gateway to the email: the check `make up`'s test
(test_observability.py) and the kind cluster's (test_kind_observability.py) share. Only how Jaeger's
``/api/traces/<id>`` is reached differs (HTTP on loopback, the API server's service proxy): the caller
passes that as ``fetch``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

# what a whole trace of an order holds: the gateway's Envoy starts it, orders and products continue it over
# HTTP, the outbox relay's publish and the notifications consumer over RabbitMQ, then the email send
SERVICES = {"orders", "products", "notifications"}
OPERATIONS = {"emporium.events publish", "notifications.events process", "smtp send"}
SHOWN = 500  # characters of the last answer or error kept for the assertion message


def complete(services: set[str], operations: set[str]) -> bool:
    return (
        services >= SERVICES
        and any("ingressgateway" in name for name in services)
        and operations >= OPERATIONS
    )


def _clip(text: str) -> str:
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


def assert_one_complete_trace(
    fetch: Callable[[str], str], trace_id: str, *, timeout: float, interval: float
) -> dict:
    """Ask ``fetch(trace_id)`` (Jaeger's raw answer to ``/api/traces/<trace_id>``) every ``interval`` seconds
    until the trace is complete or ``timeout`` has passed, then assert that it is complete and is one trace
    rooted at the gateway: every span but one has its parent inside it, and that one is the gateway's.
    Returns the trace (Jaeger's ``data[0]``).

    Until Jaeger has stored the trace it answers ``{"data": null, ...}`` (or the proxy fails): any error
    of ``fetch`` or of reading its answer means "look again". The last error or answer seen (cut to
    ``SHOWN`` characters) is in the assertion message when the trace never completes.
    """
    data: dict = {"spans": [], "processes": {}}
    services: set[str] = set()
    operations: set[str] = set()
    last = "no answer yet"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not complete(services, operations):
        time.sleep(interval)
        answer: str | None = None
        try:
            answer = fetch(trace_id)
            found = json.loads(answer)["data"][0]
            seen = {found["processes"][s["processID"]]["serviceName"] for s in found["spans"]}
            names = {s["operationName"] for s in found["spans"]}
        except Exception as exc:  # not stored yet, the proxy or Jaeger not answering: look again
            last = repr(exc) if answer is None else f"{exc!r} reading the answer {_clip(answer)}"
            continue
        data, services, operations = found, seen, names
        last = f"the answer {_clip(answer)}"
    assert complete(services, operations), (
        f"trace {trace_id} incomplete after {timeout:.0f} s: services {sorted(services)}, "
        f"operations {sorted(operations)}; last seen: {last}"
    )
    spans = data["spans"]
    ids = {s["spanID"] for s in spans}
    roots = [s for s in spans if not [r for r in s.get("references", []) if r["spanID"] in ids]]
    assert len(roots) == 1, [(s["operationName"], s.get("references")) for s in roots]
    root = data["processes"][roots[0]["processID"]]["serviceName"]
    assert "ingressgateway" in root, f"the root is {root}'s {roots[0]['operationName']}, not the gateway's"
    return data
