"""Where one reconcile's time goes: named spans (Kubernetes calls, Postgres statements, management API
calls) collected per reconcile and logged by the engine at debug level (``kopf run --verbose``)::

    postgresdatabases/ns/name: queued 0.001s, reconcile 0.094s [secrets.read 0.006, pg.acquire 0.000, ...],
    status 0.008s

Spans nest freely; a span started outside a reconcile is dropped (cheap: one context variable lookup)."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

_spans: contextvars.ContextVar[list[tuple[str, float]] | None] = contextvars.ContextVar(
    "emporium_trace", default=None
)


def begin() -> contextvars.Token:
    """Start collecting the spans of the current task (and of tasks it creates from now on)."""
    return _spans.set([])


def end(token: contextvars.Token) -> list[tuple[str, float]]:
    spans = _spans.get() or []
    _spans.reset(token)
    return spans


def current() -> list[tuple[str, float]]:
    """The spans collected so far (a copy)."""
    return list(_spans.get() or ())


@contextlib.contextmanager
def span(name: str) -> Iterator[None]:
    spans = _spans.get()
    if spans is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        spans.append((name, time.perf_counter() - start))


def format_spans(spans: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {seconds:.3f}" for name, seconds in spans)
