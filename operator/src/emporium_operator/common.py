"""Helpers every kind shares: outcomes (NotReady, Refused), drift accounting, the operator's own Secrets,
claims between objects, and how an object finds its server (also across namespaces)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import kopf

from . import events, metrics
from .conditions import get_condition, now_iso, set_condition
from .kube import KUBE
from .secrets import MANAGED_LABEL, credentials_hash, decode_data, parse_duration, secret_manifest

GROUP, VERSION = "emporium.dev", "v1alpha1"
INTERVAL = float(os.environ.get("EMPORIUM_RECONCILE_INTERVAL", "300"))  # drift check period (seconds)
RETRY_MAX = float(os.environ.get("EMPORIUM_RETRY_DELAY", "30"))  # longest wait between dependency retries
RETRY_MIN = float(os.environ.get("EMPORIUM_RETRY_MIN", "1"))  # the first retry (then doubling)
FORCE_DELETE = "emporium.dev/force-delete"
CREDENTIALS_HASH = "emporium.dev/credentials-hash"

Key = tuple[str, str, str]  # (plural, namespace, name)


class NotReady(Exception):
    """A dependency is not ready (server down, vhost missing): Ready=False and a retry with backoff.

    waits_for names what to wake up on (a server or vhost key) so the retry comes early when it is Ready."""

    def __init__(self, reason: str, message: str, waits_for: tuple | None = None):
        super().__init__(message)
        self.reason, self.message, self.waits_for = reason, message, waits_for


class Refused(Exception):
    """The spec cannot be applied as is (InvalidSpec, Conflict, Forbidden, Mismatch): Ready=False, no retry
    until the spec changes (the drift check re-evaluates)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class Outcome:
    """What a reconcile produced: status fields and the Ready reason/message (set by the kind)."""

    status: dict[str, Any] = field(default_factory=dict)
    reason: str = "Ready"
    provides: tuple | None = None  # a dependency key (server/vhost) that is now Ready


def ready_condition(body: Any) -> dict[str, Any] | None:
    return get_condition((body.get("status") or {}).get("conditions"), "Ready")


def ready_at_generation(body: Any) -> bool:
    """Ready=True for the current generation: nothing to do on resume (the drift check looks later)."""
    ready = ready_condition(body)
    status = body.get("status") or {}
    return bool(
        ready
        and ready.get("status") == "True"
        and status.get("observedGeneration") == body["metadata"].get("generation")
    )


def count_drift(kind: str, body: Any, objects: list[str], out: Outcome) -> None:
    """Changes needed while the object was Ready at its generation are drift repairs: counted, evented."""
    if objects and ready_at_generation(body):
        for obj in objects:
            metrics.DRIFT_REPAIRS.labels(kind=kind, object=obj).inc()
        out.status["driftRepairs"] = int((body.get("status") or {}).get("driftRepairs") or 0) + len(objects)
        out.status["lastDriftRepair"] = {"time": now_iso(), "objects": sorted(set(objects))}
        events.info(
            dict(body),
            reason="DriftRepaired",
            message=f"recreated or reset: {', '.join(sorted(set(objects)))}",
        )


def blocked(body: Any, patch: kopf.Patch, reason: str, message: str) -> kopf.TemporaryError:
    """Deletion cannot proceed: a DeletionBlocked condition, an Event on change, a retry."""
    conditions = (body.get("status") or {}).get("conditions")
    previous = get_condition(conditions, "DeletionBlocked")
    patch.status["conditions"] = set_condition(conditions, "DeletionBlocked", True, reason, message)
    if not previous or previous.get("reason") != reason:
        events.warn(dict(body), reason="DeletionBlocked", message=message)
    return kopf.TemporaryError(message, delay=min(5.0, RETRY_MAX))


def force_delete(body: Any) -> bool:
    return (body["metadata"].get("annotations") or {}).get(FORCE_DELETE) == "true"


def unreachable(exc: BaseException) -> bool:
    return isinstance(
        exc,
        OSError
        | asyncio.TimeoutError
        | asyncpg.CannotConnectNowError
        | asyncpg.ConnectionDoesNotExistError
        | httpx.TransportError,
    )


def background(coro: Awaitable[Any]) -> asyncio.Future:
    """Run coro concurrently; the caller awaits the result (or cancels it). An exception nobody awaits
    (the caller failed first) is not reported as never retrieved."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_retrieve)
    return task


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


# --- the operator's Secrets ---------------------------------------------------------------------


def owns(secret: dict[str, Any], body: Any) -> bool:
    owners = secret["metadata"].get("ownerReferences") or []
    return any(o.get("uid") == body["metadata"]["uid"] and o.get("controller") for o in owners)


async def own_secret(body: Any, name: str) -> dict[str, Any] | None:
    """The object's connection Secret, or None when absent. A Secret of that name that this object does not
    own is refused before anything in it is used (its data is never read)."""
    current = await KUBE.get(KUBE.secret_path(body["metadata"]["namespace"], name))
    if current is not None and not owns(current, body):
        raise Refused("Conflict", f"Secret {name!r} exists and is not owned by this {body['kind']}")
    return current


# The resourceVersion of each Secret as the operator last wrote it: its own writes need no reconcile.
OWN_WRITES: dict[tuple[str, str], str] = {}


async def write_secret(
    body: Any, name: str, data: dict[str, str], current: dict | None, annotations: dict[str, str]
) -> bool:
    """Apply the Secret when its data or annotations differ; never one that is not ours."""
    namespace = body["metadata"]["namespace"]
    if current is not None:
        if not owns(current, body):
            raise Refused("Conflict", f"Secret {name!r} exists and is not owned by this {body['kind']}")
        have_annotations = current["metadata"].get("annotations") or {}
        if (
            decode_data(current) == data
            and (current["metadata"].get("labels") or {}).get(MANAGED_LABEL) == "true"
            and all(have_annotations.get(k) == v for k, v in annotations.items())
        ):
            return False
    manifest = secret_manifest(name, namespace, body, data, annotations)
    written = await KUBE.apply(KUBE.secret_path(namespace, name), manifest)
    OWN_WRITES[(namespace, name)] = written["metadata"]["resourceVersion"]
    return True


class CredentialsSecret:
    """An object's connection Secret during one reconcile, so that a password is never lost. It is read
    while the backend is observed (a Secret this object does not own is refused before anything changes). A
    new Secret is written while the backend steps run: should one fail, the next reconcile uses the password
    in it. An existing one only after them (`save`): a rotated password reaches the backend first, then the
    Secret.

        async with CredentialsSecret(body, name) as secret:
            ...observe...
            current = await secret.read()
            ...plan, then secret.prepare(data), then apply the steps...
        await secret.save()
    """

    def __init__(self, body: Any, name: str) -> None:
        self.body, self.name = body, name
        self.current: dict[str, Any] | None = None
        self._data: dict[str, str] = {}
        self._reading: asyncio.Future | None = None
        self._creating: asyncio.Future | None = None

    async def __aenter__(self) -> CredentialsSecret:
        self._reading = background(own_secret(self.body, self.name))
        return self

    async def read(self) -> dict[str, Any] | None:
        assert self._reading is not None, "read() inside `async with`"
        self.current = await self._reading
        return self.current

    def prepare(self, data: dict[str, str]) -> None:
        """The data the Secret must hold; a new Secret starts being written now."""
        self._data = data
        if self.current is None:
            self._creating = background(write_secret(self.body, self.name, data, None, self._annotations()))

    async def __aexit__(self, *exc: object) -> None:
        assert self._reading is not None
        self._reading.cancel()
        if self._creating is not None:  # never left half written, also when a step failed
            await asyncio.wait([self._creating])

    async def save(self) -> None:
        """After the backend steps succeeded: the new Secret's write done, or the existing one updated."""
        if self._creating is not None:
            await self._creating
        else:
            await write_secret(self.body, self.name, self._data, self.current, self._annotations())

    def _annotations(self) -> dict[str, str]:
        return {CREDENTIALS_HASH: credentials_hash(self._data)}


def secret_password(current: dict | None) -> str | None:
    return decode_data(current).get("password") or None


def rotation_due(spec: dict[str, Any], status: dict[str, Any], now: dt.datetime) -> tuple[bool, str | None]:
    rotation = spec.get("passwordRotation") or {}
    trigger = rotation.get("trigger")
    interval = parse_duration(rotation.get("interval"))
    if trigger and trigger != status.get("rotationTrigger"):
        return True, trigger
    rotated_at = status.get("passwordRotatedAt")
    if interval and rotated_at:
        last = dt.datetime.fromisoformat(rotated_at.replace("Z", "+00:00"))
        if (now - last).total_seconds() >= interval:
            return True, trigger
    return False, trigger


# --- claims: two objects for the same database, role, vhost or user -----------------------------


def claim(body: Any, server: tuple[str, str] | None) -> tuple[str, str, str, tuple[str, str] | None]:
    meta = body["metadata"]
    return (meta.get("creationTimestamp") or "", meta["namespace"], meta["name"], server)


def claim_winner(
    claims: Iterable[tuple], namespace: str, name: str, endpoint_of: Callable[[Any], str | None]
) -> str | None:
    """Claims are (creationTimestamp, namespace, name, server key) for one database, role, vhost or user
    name. Rivals are claims whose server object points at the same physical server as mine; the earliest
    wins. Returns "namespace/name" of the winner when it is not me."""
    claims = list(claims)
    mine_claim = next((c for c in claims if c[1:3] == (namespace, name)), None)
    mine = endpoint_of(mine_claim[3]) if mine_claim else None
    if mine is None:
        return None
    rivals = sorted(c for c in claims if endpoint_of(c[3]) == mine)
    if rivals and rivals[0][1:3] != (namespace, name):
        return f"{rivals[0][1]}/{rivals[0][2]}"
    return None


# --- servers, also from other namespaces --------------------------------------------------------


def server_key(body: Any) -> tuple[str, str]:
    ref = (body.get("spec") or {}).get("serverRef") or {}
    return (ref.get("namespace") or body["metadata"]["namespace"], ref.get("name", ""))


_namespace_labels: dict[str, tuple[float, dict[str, str]]] = {}


async def namespace_labels(namespace: str) -> dict[str, str]:
    """Labels of a namespace (cached for a few seconds), for allowedNamespaces.selector."""
    loop = asyncio.get_running_loop()
    cached = _namespace_labels.get(namespace)
    if cached and loop.time() - cached[0] < 5:
        return cached[1]
    ns = await KUBE.get(f"/api/v1/namespaces/{namespace}")
    labels = dict(((ns or {}).get("metadata") or {}).get("labels") or {})
    _namespace_labels[namespace] = (loop.time(), labels)
    return labels


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels, matchExpressions) against a label map."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


async def namespace_allowed(server: Any, namespace: str) -> bool:
    """Whether objects in namespace may use the server: its own namespace always; others when listed in
    spec.allowedNamespaces.names or matched by spec.allowedNamespaces.selector."""
    if namespace == server["metadata"]["namespace"]:
        return True
    allowed = (server.get("spec") or {}).get("allowedNamespaces") or {}
    if namespace in (allowed.get("names") or []):
        return True
    selector = allowed.get("selector")
    if selector is not None and (selector.get("matchLabels") or selector.get("matchExpressions")):
        return selector_matches(selector, await namespace_labels(namespace))
    return False


NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
