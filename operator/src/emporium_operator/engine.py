"""The reconcile engine: one store of every object (fed by Kopf's watch events), one scheduler, a pool of
workers, per-object locks and leadership.

Why not Kopf's change handlers: each one writes progress and diff-base annotations to the object (two
extra API writes per change), retries on a fixed delay, and needs a timer (and so a finalizer on every
object) for drift checks. Here a change, a Secret event, a dependency becoming Ready, a retry and the
drift check are all the same thing: "reconcile this key, at this time". Kopf still streams the objects
(watch, reconnects, bookmarks) and runs the delete handlers (finalizers only where cleanup is needed).

Scheduling: new objects and spec changes at once (FIFO, so a burst finishes roughly in order); objects
already Ready at their generation when first seen (a restart) only get a drift check at a random offset;
dependency waits back off from RETRY_MIN doubling to RETRY_MAX, and are woken as soon as the server or vhost
they wait for becomes Ready."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import kopf

from . import events, metrics, trace
from .common import (
    INTERVAL,
    RETRY_MAX,
    RETRY_MIN,
    Key,
    NotReady,
    Outcome,
    Refused,
    namespace_allowed,
    ready_at_generation,
)
from .conditions import get_condition, remove_condition, set_condition
from .kube import KUBE

log = logging.getLogger("emporium_operator.engine")

WORKERS = 16

Reconcile = Callable[[dict[str, Any], Outcome], Awaitable[str]]


@dataclass
class KindSpec:
    kind: str
    plural: str
    reconcile: Reconcile


# Never read here, and most of a stored body's size: the store keeps objects without them.
_UNREAD_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})


def _slim(body: dict[str, Any]) -> dict[str, Any]:
    """The body as the store keeps it: without metadata.managedFields and kubectl's copy of the last applied
    object (a shallow copy; nothing in the operator reads either)."""
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations and not _UNREAD_ANNOTATIONS.isdisjoint(annotations):
        meta["annotations"] = {k: v for k, v in annotations.items() if k not in _UNREAD_ANNOTATIONS}
    return {**body, "metadata": meta}


def _rv(body: dict[str, Any]) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


class Engine:
    def __init__(self) -> None:
        self.kinds: dict[str, KindSpec] = {}
        self.bodies: dict[Key, dict[str, Any]] = {}
        self.locks: dict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.seen_generation: dict[Key, int] = {}
        self.attempts: dict[Key, int] = {}
        self.waiting: dict[tuple, set[Key]] = defaultdict(set)
        self.due: dict[Key, float] = {}
        self.heap: list[tuple[float, int, Key]] = []
        self.counter = 0
        self.running: set[Key] = set()
        self.queued_at: dict[Key, float] = {}  # when a key became due (for the debug trace)
        self.rerun: set[Key] = set()
        self.queue: asyncio.Queue[Key] | None = None
        self.wakeup: asyncio.Event | None = None
        self.active: asyncio.Event | None = None
        self.tasks: list[asyncio.Task] = []

    def register(self, spec: KindSpec) -> None:
        self.kinds[spec.plural] = spec
        # Read at scrape time, in the metrics server's thread: copies (list(dict)) are taken in one step.
        metrics.OBJECTS.labels(kind=spec.kind).set_function(
            lambda: sum(1 for key in list(self.bodies) if key[0] == spec.plural)
        )
        metrics.PENDING.set_function(self.pending)

    def pending(self) -> int:
        """Reconciles due now, queued or running: 0 once the operator has caught up."""
        now = time.monotonic()
        queued = self.queue.qsize() if self.queue is not None else 0
        return sum(1 for at in list(self.due.values()) if at <= now) + queued + len(self.running)

    # -- the store ---------------------------------------------------------------------------------

    def objects(self, plural: str) -> list[dict[str, Any]]:
        return [b for (p, _, _), b in self.bodies.items() if p == plural]

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.bodies.get((plural, namespace, name))

    def observe(self, plural: str, event_type: str | None, body: dict[str, Any]) -> None:
        """A watch event: keep the newest body; schedule what changed."""
        body = _slim(body)
        meta = body["metadata"]
        key = (plural, meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self.forget(key)
            return
        current = self.bodies.get(key)
        if current is not None and current["metadata"].get("uid") != meta.get("uid"):
            self.forget(key)  # deleted and recreated under the same name
            current = None
        if current is None or _rv(body) >= _rv(current):
            self.bodies[key] = body
        if meta.get("deletionTimestamp"):
            return
        generation = meta.get("generation")
        if key not in self.seen_generation:
            self.seen_generation[key] = generation
            if ready_at_generation(body):
                self.schedule(key, random.uniform(0, INTERVAL))  # noqa: S311 - spreading checks
            else:
                self.schedule(key, 0)
        elif self.seen_generation[key] != generation:
            self.seen_generation[key] = generation
            self.attempts.pop(key, None)
            self.schedule(key, 0)

    def forget(self, key: Key) -> None:
        self.bodies.pop(key, None)
        self.seen_generation.pop(key, None)
        self.attempts.pop(key, None)
        self.due.pop(key, None)
        self.queued_at.pop(key, None)
        for waiters in self.waiting.values():
            waiters.discard(key)

    def nudge(self, key: Key) -> None:
        """Reconcile now (a Secret changed, a dependency became Ready)."""
        if key in self.bodies:
            self.schedule(key, 0)

    def wake(self, dependency: tuple) -> None:
        for key in list(self.waiting.pop(dependency, ())):
            self.nudge(key)

    # -- scheduling --------------------------------------------------------------------------------

    def schedule(self, key: Key, delay: float) -> None:
        at = time.monotonic() + max(0.0, delay)
        if key in self.due and self.due[key] <= at:
            return
        self.due[key] = at
        self.counter += 1
        heapq.heappush(self.heap, (at, self.counter, key))
        if self.wakeup is not None:
            self.wakeup.set()

    async def _scheduler(self) -> None:
        assert self.queue is not None and self.wakeup is not None and self.active is not None
        while True:
            await self.active.wait()
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                at, _, key = heapq.heappop(self.heap)
                if self.due.get(key) != at:
                    continue  # rescheduled earlier, or forgotten
                del self.due[key]
                self.queued_at[key] = at
                self.queue.put_nowait(key)
            timeout = self.heap[0][0] - now if self.heap else None
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout)

    async def _worker(self) -> None:
        assert self.queue is not None and self.active is not None
        while True:
            key = await self.queue.get()
            await self.active.wait()
            if key in self.running:
                self.rerun.add(key)
                continue
            self.running.add(key)
            try:
                await self.process(key)
            except Exception:
                log.exception("reconcile of %s failed unexpectedly", key)
                self.schedule(key, RETRY_MAX)
            finally:
                self.running.discard(key)
                if key in self.rerun:
                    self.rerun.discard(key)
                    self.schedule(key, 0)

    def start(self) -> None:
        """Start from nothing (an operator restarted in the same process, as tests do, sees it all anew)."""
        kinds = self.kinds
        self.__init__()
        self.kinds = kinds
        self.queue, self.wakeup, self.active = asyncio.Queue(), asyncio.Event(), asyncio.Event()
        self.tasks = [asyncio.create_task(self._scheduler(), name="emporium-scheduler")]
        self.tasks += [
            asyncio.create_task(self._worker(), name=f"emporium-worker-{i}") for i in range(WORKERS)
        ]

    def set_active(self, active: bool) -> None:
        """Leadership: only the active replica reconciles; a new leader starts from what it sees."""
        if self.active is None:
            self.active = asyncio.Event()
        if active and not self.active.is_set():
            for key, body in list(self.bodies.items()):
                if not body["metadata"].get("deletionTimestamp"):
                    self.due.pop(key, None)
                    if ready_at_generation(body):
                        self.schedule(key, random.uniform(0, INTERVAL))  # noqa: S311
                    else:
                        self.schedule(key, 0)
            self.active.set()
        elif not active:
            self.active.clear()

    @property
    def is_active(self) -> bool:
        return self.active is not None and self.active.is_set()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    # -- one reconcile -----------------------------------------------------------------------------

    async def process(self, key: Key) -> None:
        spec = self.kinds[key[0]]
        started = time.monotonic()
        queued = started - self.queued_at.pop(key, started)
        token = trace.begin()
        try:
            await self._process(key, spec, started, queued)
        finally:
            trace.end(token)

    async def _process(self, key: Key, spec: KindSpec, started: float, queued: float) -> None:
        async with self.locks[key]:
            body = self.bodies.get(key)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            generation = body["metadata"].get("generation")
            status = dict(body.get("status") or {})
            conditions = status.get("conditions") or []
            out = Outcome()
            patch: dict[str, Any] = {"observedGeneration": generation}
            with metrics.timed(spec.kind):
                try:
                    message = await spec.reconcile(body, out)
                except NotReady as e:
                    delay = self._backoff(key)
                    if e.waits_for is not None:
                        self.waiting[e.waits_for].add(key)
                    patch["conditions"] = self._fail(
                        spec.kind, body, conditions, generation, e.reason, e.message
                    )
                    self.schedule(key, delay)
                except Refused as e:
                    patch["conditions"] = self._fail(
                        spec.kind, body, conditions, generation, e.reason, e.message
                    )
                    if e.reason == "Conflict":
                        patch["conditions"] = set_condition(
                            patch["conditions"], "Conflict", True, e.reason, e.message, generation
                        )
                    self.schedule(key, INTERVAL)
                except Exception as e:
                    log.warning("reconcile %s/%s/%s: %s: %s", *key, type(e).__name__, e)
                    message = f"{type(e).__name__}: {e}"
                    patch["conditions"] = self._fail(
                        spec.kind, body, conditions, generation, "ReconcileError", message
                    )
                    self.schedule(key, self._backoff(key))
                else:
                    self.attempts.pop(key, None)
                    conditions = remove_condition(conditions, "Conflict")
                    patch["conditions"] = set_condition(
                        conditions, "Ready", True, out.reason, message, generation
                    )
                    metrics.RECONCILE_TOTAL.labels(kind=spec.kind, result="ok").inc()
                    self.schedule(key, INTERVAL * random.uniform(0.9, 1.1))  # noqa: S311
                    if out.provides is not None:
                        self.wake(out.provides)
                patch.update(out.status)  # what the kind recorded, also when it then failed
                worked = time.monotonic()
                spans = trace.current()
                await self._patch_status(key, body, patch)
                log.debug(
                    "%s/%s/%s: queued %.3fs, reconcile %.3fs [%s], status %.3fs",
                    *key,
                    queued,
                    worked - started,
                    trace.format_spans(spans),
                    time.monotonic() - worked,
                )

    def _backoff(self, key: Key) -> float:
        attempt = self.attempts.get(key, 0)
        self.attempts[key] = attempt + 1
        return min(RETRY_MAX, RETRY_MIN * (2**attempt))

    def _fail(self, kind, body, conditions, generation, reason, message) -> list[dict[str, Any]]:
        previous = get_condition(conditions, "Ready")
        result = {
            "InvalidSpec": "invalid",
            "Conflict": "conflict",
            "Forbidden": "forbidden",
            "ReconcileError": "error",
        }.get(reason, "not_ready")
        metrics.RECONCILE_TOTAL.labels(kind=kind, result=result).inc()
        metrics.RECONCILE_ERRORS.labels(kind=kind, reason=reason).inc()
        if not previous or previous.get("reason") != reason:  # an Event per transition, not per retry
            events.warn(dict(body), reason=reason, message=message)
        return set_condition(conditions, "Ready", False, reason, message, generation)

    async def _patch_status(self, key: Key, body: dict[str, Any], status: dict[str, Any]) -> None:
        have = body.get("status") or {}
        if all(have.get(k) == v for k, v in status.items()):
            return  # nothing new (a drift check that found nothing)
        plural, namespace, name = key
        path = KUBE.custom_path(namespace, plural, name) + "/status"
        try:
            result = await KUBE.merge_patch(path, {"status": status})
        except httpx.HTTPError as e:
            log.warning("status of %s/%s/%s not written: %s", *key, e)
            self.schedule(key, RETRY_MIN)
            return
        if result is not None:
            result = _slim(result)
            current = self.bodies.get(key)
            if current is None or _rv(result) >= _rv(current):
                self.bodies[key] = result


ENGINE = Engine()


def reclaims(spec: Any, **_: Any) -> bool:
    """A kind's delete handler filter: only reclaimPolicy Delete needs the finalizer. Retain objects go at
    once (a namespace deletion never waits for the operator)."""
    return (spec or {}).get("reclaimPolicy", "Retain") == "Delete"


def locked_delete(
    plural: str, cleanup: Callable[[dict[str, Any], kopf.Patch, Any], Awaitable[None]]
) -> Callable[..., Awaitable[None]]:
    """A kind's delete handler: only on the active replica, under the lock its reconciles take."""

    async def delete(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
        if not ENGINE.is_active:
            raise kopf.TemporaryError("not the active replica", delay=1)
        meta = body["metadata"]
        async with ENGINE.locks[(plural, meta["namespace"], meta["name"])]:
            await cleanup(dict(body), patch, logger)

    return delete


async def referenced_server(body: dict[str, Any], plural: str, kind: str) -> dict[str, Any]:
    """The server object (``kind``) an object's spec.serverRef {name, namespace} names, if it exists and
    lets the object's namespace use it; NotReady (waiting on that server) otherwise."""
    ref = body["spec"]["serverRef"]
    namespace = ref.get("namespace") or body["metadata"]["namespace"]
    key = (plural, namespace, ref["name"])
    server = ENGINE.get(*key)
    if server is None or server["metadata"].get("deletionTimestamp"):
        raise NotReady("ServerNotFound", f"{kind} {ref['name']!r} not found in {namespace}", key)
    if not await namespace_allowed(server, body["metadata"]["namespace"]):
        raise NotReady(
            "NamespaceNotAllowed",
            f"{kind} {namespace}/{ref['name']} does not allow namespace "
            f"{body['metadata']['namespace']!r} (spec.allowedNamespaces)",
            key,
        )
    return server
