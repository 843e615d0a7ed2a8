"""RabbitMQ management API client (httpx) and pure topology planning (policies, bindings, permissions).

Every name goes into URL paths percent-encoded with safe='' so no vhost, queue or exchange name can
escape its path segment (a vhost called "../" is just a vhost)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from . import trace

POLICY_PREFIX = "emporium-queue."
POLICY_PRIORITY = 100
# Statistics-free reads: the management stats DB lags behind (and on some versions crashes for a vhost
# created a moment ago), while the operator needs only definitions and message totals.
NO_STATS = {"disable_stats": "true"}


def owner_tag(owner_ref: str) -> str:
    """The tag the operator puts on the broker users it creates (owner_ref: namespace/name)."""
    return f"emporium-operator:{owner_ref}"


def vhost_description(owner_ref: str) -> str:
    """The description (metadata) the operator puts on the vhosts it creates (owner_ref: namespace/name)."""
    return f"managed by emporium-operator ({owner_ref})"


VHOST_MARK = "managed by emporium-operator ("


def user_tags(user: dict[str, Any]) -> list[str]:
    tags = user.get("tags") or []
    if isinstance(tags, str):
        tags = tags.split(",")
    return [t.strip() for t in tags if t.strip()]


def user_takeover(
    user: dict[str, Any] | None, name: str, tag: str, admin_user: str, known_password: str | None = None
) -> str | None:
    """Why writing broker user name would take over a user the operator does not own (None: it would not).

    known_password: the password in this object's own Secret; a user without tags whose hash matches it was
    made by an earlier version of the operator for this object (adopting it needs the password)."""
    if name == admin_user:
        return f"user {name!r} is the broker's admin user"
    if user is None:
        return None
    tags = user_tags(user)
    if not tags and known_password and password_matches(user.get("password_hash"), known_password):
        return None
    if tags != [tag]:
        if [t for t in tags if not t.startswith("emporium-operator:")]:
            return f"user {name!r} exists with tags {tags}; users with tags are never managed"
        return f"user {name!r} exists and was not created by the operator for this object"
    return None


class Forbidden(Exception):
    """Applying the spec would take over a broker user or vhost the operator does not own."""


class RabbitError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def q(name: str) -> str:
    return quote(name, safe="")


# --- password hashes (rabbit_password_hashing_sha256) -------------------------------------------


def password_hash(password: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def password_matches(hashed: str | None, password: str) -> bool:
    if not hashed:
        return False
    try:
        raw = base64.b64decode(hashed)
    except ValueError:
        return False
    salt, digest = raw[:4], raw[4:]
    return hmac.compare_digest(hashlib.sha256(salt + password.encode()).digest(), digest)


# --- pure planning -----------------------------------------------------------------------------


def policy_name(queue: str) -> str:
    return POLICY_PREFIX + queue


def queue_policy(queue: dict[str, Any]) -> dict[str, Any] | None:
    """Compile a queue's tunables into the operator-owned policy definition (None when there are none)."""
    definition: dict[str, Any] = {}
    dl = queue.get("deadLetter") or {}
    if dl.get("exchange"):
        definition["dead-letter-exchange"] = dl["exchange"]
        if dl.get("routingKey"):
            definition["dead-letter-routing-key"] = dl["routingKey"]
        if dl.get("strategy"):
            definition["dead-letter-strategy"] = dl["strategy"]
    for key, policy_key in (
        ("messageTtl", "message-ttl"),
        ("maxLength", "max-length"),
        ("maxLengthBytes", "max-length-bytes"),
        ("overflow", "overflow"),
        ("deliveryLimit", "delivery-limit"),
        ("expires", "expires"),
    ):
        if queue.get(key) is not None:
            definition[policy_key] = queue[key]
    if not definition:
        return None
    return {
        "pattern": "^" + re.escape(queue["name"]) + "$",
        "apply-to": "queues",
        "priority": POLICY_PRIORITY,
        "definition": definition,
    }


def default_permissions(exchanges: list[str], queues: list[str]) -> dict[str, str]:
    """Least privilege: no configure, write on the declared exchanges, read on the declared queues."""

    def alt(names: list[str]) -> str:
        return "^(" + "|".join(re.escape(n) for n in sorted(set(names))) + ")$" if names else "^$"

    return {"configure": "^$", "write": alt(exchanges), "read": alt(queues)}


def binding_key(b: dict[str, Any]) -> tuple[str, str, str, str]:
    return (b["source"], b["destination"], b.get("destinationType", "queue"), b.get("routingKey", ""))


@dataclass
class DesiredTopology:
    vhost: str
    user: str
    password: str
    permissions: dict[str, str]
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    queues: list[dict[str, Any]] = field(default_factory=list)
    bindings: list[dict[str, Any]] = field(default_factory=list)
    tag: str = ""  # owner_tag(...): marks the user as the operator's, for this object

    @property
    def policies(self) -> dict[str, dict[str, Any]]:
        return {policy_name(qu["name"]): p for qu in self.queues if (p := queue_policy(qu))}


def desired_topology(spec: dict[str, Any], name: str, password: str, tag: str = "") -> DesiredTopology:
    """Expand the RabbitTopology spec (including the deadLetter shorthand) into concrete entities."""
    exchanges = [dict(e) for e in spec.get("exchanges") or []]
    queues = [dict(x) for x in spec.get("queues") or []]
    bindings = [dict(b) for b in spec.get("bindings") or []]
    dl = spec.get("deadLetter")
    if dl:
        if dl["exchange"] not in {e["name"] for e in exchanges}:
            exchanges.append(
                {"name": dl["exchange"], "type": dl.get("exchangeType", "topic"), "durable": True}
            )
        if dl.get("queue"):
            if dl["queue"] not in {x["name"] for x in queues}:
                queues.append({"name": dl["queue"], "type": dl.get("queueType", "quorum"), "durable": True})
            bindings.append(
                {
                    "source": dl["exchange"],
                    "destination": dl["queue"],
                    "destinationType": "queue",
                    "routingKey": "#",
                }
            )
    for e in exchanges:
        e.setdefault("type", "topic")
        e.setdefault("durable", True)
    for x in queues:
        x.setdefault("type", "quorum")
        x.setdefault("durable", True)
    seen, unique = set(), []
    for b in bindings:
        b.setdefault("destinationType", "queue")
        b.setdefault("routingKey", "")
        if binding_key(b) not in seen:
            seen.add(binding_key(b))
            unique.append(b)
    user = (spec.get("user") or {}).get("name") or name
    perms = (spec.get("user") or {}).get("permissions") or default_permissions(
        [e["name"] for e in exchanges], [x["name"] for x in queues]
    )
    return DesiredTopology(spec["vhost"], user, password, perms, exchanges, queues, unique, tag=tag)


# --- HTTP client ---------------------------------------------------------------------------------


class RabbitAdmin:
    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        timeout: float = 10,
        verify: bool = True,
        concurrency: int = 4,
    ):
        self.client = httpx.AsyncClient(
            base_url=url.rstrip("/") + "/api",
            auth=(user, password),
            timeout=timeout,
            verify=verify,
            # A reconcile sends its four reads at once.
            limits=httpx.Limits(max_connections=concurrency * 4, max_keepalive_connections=concurrency * 4),
        )
        # How many reconciles talk to this broker at once (the management API serialises much of it).
        self.limit = asyncio.Semaphore(concurrency)

    async def __aenter__(self) -> RabbitAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Clients are shared per server (one connection pool, one TLS context); aclose() ends them."""

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _call(
        self, method: str, path: str, body: Any = None, params: dict | None = None, missing_ok: bool = False
    ) -> Any:
        with trace.span(f"rabbit.{method} {path.split('/')[1]}"):
            response = await self.client.request(method, path, json=body, params=params)
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            raise RabbitError(response.status_code, response.text[:300])
        return response.json() if response.content else {}

    async def overview(self) -> dict[str, Any]:
        return await self._call("GET", "/overview", params=NO_STATS)

    async def get_vhost(self, vhost: str) -> dict | None:
        return await self._call("GET", f"/vhosts/{q(vhost)}", params=NO_STATS, missing_ok=True)

    async def put_vhost(self, vhost: str, description: str) -> None:
        await self._call("PUT", f"/vhosts/{q(vhost)}", {"description": description})

    async def delete_vhost(self, vhost: str) -> None:
        await self._call("DELETE", f"/vhosts/{q(vhost)}", missing_ok=True)

    async def get_user(self, user: str) -> dict | None:
        return await self._call("GET", f"/users/{q(user)}", missing_ok=True)

    async def put_user(self, user: str, password: str, tag: str) -> None:
        await self._call(
            "PUT",
            f"/users/{q(user)}",
            {
                "password_hash": password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": tag,
            },
        )

    async def delete_user(self, user: str) -> None:
        await self._call("DELETE", f"/users/{q(user)}", missing_ok=True)

    async def get_permissions(self, vhost: str, user: str) -> dict | None:
        return await self._call("GET", f"/permissions/{q(vhost)}/{q(user)}", missing_ok=True)

    async def put_permissions(self, vhost: str, user: str, perms: dict[str, str]) -> None:
        await self._call("PUT", f"/permissions/{q(vhost)}/{q(user)}", perms)

    async def list_exchanges(self, vhost: str) -> list[dict]:
        return await self._call(
            "GET", f"/exchanges/{q(vhost)}", params={**NO_STATS, "columns": "name,type,durable"}
        )

    async def put_exchange(self, vhost: str, e: dict[str, Any]) -> None:
        await self._call(
            "PUT",
            f"/exchanges/{q(vhost)}/{q(e['name'])}",
            {
                "type": e.get("type", "topic"),
                "durable": e.get("durable", True),
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            },
        )

    async def delete_exchange(self, vhost: str, name: str) -> None:
        await self._call("DELETE", f"/exchanges/{q(vhost)}/{q(name)}", missing_ok=True)

    async def list_queues(self, vhost: str) -> list[dict]:
        return await self._call(
            "GET",
            f"/queues/{q(vhost)}",
            params={
                **NO_STATS,
                "enable_queue_totals": "true",
                "columns": "name,type,durable,messages,arguments",
            },
        )

    async def get_queue(self, vhost: str, name: str) -> dict | None:
        return await self._call("GET", f"/queues/{q(vhost)}/{q(name)}", params=NO_STATS, missing_ok=True)

    async def put_queue(self, vhost: str, x: dict[str, Any]) -> None:
        await self._call(
            "PUT",
            f"/queues/{q(vhost)}/{q(x['name'])}",
            {
                "durable": x.get("durable", True),
                "auto_delete": False,
                "arguments": {"x-queue-type": x.get("type", "quorum")},
            },
        )

    async def delete_queue(self, vhost: str, name: str) -> None:
        await self._call("DELETE", f"/queues/{q(vhost)}/{q(name)}", missing_ok=True)

    async def list_bindings(self, vhost: str) -> list[dict]:
        return await self._call("GET", f"/bindings/{q(vhost)}")

    async def post_binding(self, vhost: str, b: dict[str, Any]) -> None:
        kind = "q" if b.get("destinationType", "queue") == "queue" else "e"
        await self._call(
            "POST",
            f"/bindings/{q(vhost)}/e/{q(b['source'])}/{kind}/{q(b['destination'])}",
            {"routing_key": b.get("routingKey", ""), "arguments": {}},
        )

    async def delete_binding(self, vhost: str, b: dict[str, Any], properties_key: str) -> None:
        kind = "q" if b.get("destinationType", "queue") == "queue" else "e"
        await self._call(
            "DELETE",
            f"/bindings/{q(vhost)}/e/{q(b['source'])}/{kind}/{q(b['destination'])}/{q(properties_key)}",
            missing_ok=True,
        )

    async def get_definitions(self, vhost: str) -> dict[str, Any] | None:
        """Exchanges, queues, bindings and policies of a vhost in one call (None: no such vhost)."""
        try:
            return await self._call("GET", f"/definitions/{q(vhost)}", missing_ok=True)
        except RabbitError as e:
            if e.status == 400 and "vhost_not_found" in str(e):  # how 3.x answers for a missing vhost
                return None
            raise

    async def post_definitions(self, vhost: str, definitions: dict[str, Any]) -> None:
        """Declare exchanges, queues, bindings and policies of a vhost in one call (upsert)."""
        await self._call("POST", f"/definitions/{q(vhost)}", definitions)

    async def post_global_definitions(self, definitions: dict[str, Any]) -> None:
        """Users, permissions, exchanges, queues, bindings and policies (each naming its vhost) in one
        call (upsert; users before permissions, as the broker imports them in that order)."""
        await self._call("POST", "/definitions", definitions)

    async def list_policies(self, vhost: str) -> list[dict]:
        return await self._call("GET", f"/policies/{q(vhost)}")

    async def put_policy(self, vhost: str, name: str, policy: dict[str, Any]) -> None:
        await self._call("PUT", f"/policies/{q(vhost)}/{q(name)}", policy)

    async def delete_policy(self, vhost: str, name: str) -> None:
        await self._call("DELETE", f"/policies/{q(vhost)}/{q(name)}", missing_ok=True)


def observed_binding_key(b: dict[str, Any]) -> tuple[str, str, str, str]:
    return (b["source"], b["destination"], b["destination_type"], b.get("routing_key", ""))


@dataclass
class TopologyResult:
    repairs: list[str] = field(default_factory=list)  # object labels of what had to be (re)created
    retained: list[str] = field(default_factory=list)  # pruned queues kept (reclaimPolicy Retain / not empty)
    mismatches: list[str] = field(default_factory=list)  # type/durability on the broker differs from the spec


def _queue_type(x: dict[str, Any]) -> str:
    return (x.get("arguments") or {}).get("x-queue-type") or x.get("type") or "classic"


@dataclass
class ObservedTopology:
    """What ensure_topology compares against: the vhost, the user, its permissions and the vhost's
    definitions (exchanges, queues, bindings, policies)."""

    vhost: dict[str, Any] | None
    user: dict[str, Any] | None
    permissions: dict[str, Any] | None
    definitions: dict[str, Any]


async def observe_topology(api: RabbitAdmin, vhost_name: str, user_name: str) -> ObservedTopology:
    """Four independent reads, sent at once (one round trip instead of four)."""
    vhost, user, perms, have = await asyncio.gather(
        api.get_vhost(vhost_name),
        api.get_user(user_name),
        api.get_permissions(vhost_name, user_name),
        api.get_definitions(vhost_name),
    )
    return ObservedTopology(vhost, user, perms, have or {})


async def ensure_topology(
    api: RabbitAdmin,
    want: DesiredTopology,
    previous: dict[str, list],
    allow_queue_delete: bool,
    shared_exchanges: frozenset[str] = frozenset(),
    admin_user: str = "",
    known_password: bool = False,
    observed: ObservedTopology | None = None,
) -> TopologyResult:
    """Compare with what the broker has (observed, or read now: four reads at once) and declare everything
    missing in one call (POST /api/definitions: user, permissions, exchanges, queues, bindings, policies),
    then prune what the previous spec had. Raises Forbidden (nothing changed) when the broker user is not
    the operator's."""
    if observed is None:
        observed = await observe_topology(api, want.vhost, want.user)
    declare, res = plan_topology(want, observed, admin_user, known_password)
    await apply_topology(api, want, observed, declare, res, previous, allow_queue_delete, shared_exchanges)
    return res


def plan_topology(
    want: DesiredTopology, observed: ObservedTopology, admin_user: str = "", known_password: bool = False
) -> tuple[dict[str, list], TopologyResult]:
    """What to declare (the body of one POST /api/definitions) and what it repairs; Forbidden (nothing to
    declare) when the broker user is not the operator's."""
    res = TopologyResult()
    vh = want.vhost
    user, perms, have = observed.user, observed.permissions, observed.definitions
    problem = user_takeover(user, want.user, want.tag, admin_user, want.password if known_password else None)
    if problem:
        raise Forbidden(problem)
    declare: dict[str, list] = {
        "users": [],
        "permissions": [],
        "exchanges": [],
        "queues": [],
        "bindings": [],
        "policies": [],
    }
    if user is None or user_tags(user) != [want.tag]:
        res.repairs.append("user" if user is None else "ownership")
    elif not password_matches(user.get("password_hash"), want.password):
        res.repairs.append("password")
    if res.repairs:
        declare["users"].append(
            {
                "name": want.user,
                "password_hash": password_hash(want.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": want.tag,
            }
        )
    if not perms or any(perms.get(k) != want.permissions[k] for k in ("configure", "write", "read")):
        declare["permissions"].append({"user": want.user, "vhost": vh, **want.permissions})
        res.repairs.append("permission")

    exchanges = {e["name"]: e for e in have.get("exchanges") or []}
    queues = {x["name"]: x for x in have.get("queues") or []}
    policies = {p["name"]: p for p in have.get("policies") or []}
    bindings = {observed_binding_key(b) for b in have.get("bindings") or [] if b.get("source")}
    for e in want.exchanges:
        found = exchanges.get(e["name"])
        if found is None:
            declare["exchanges"].append(
                {
                    "name": e["name"],
                    "vhost": vh,
                    "type": e["type"],
                    "durable": e["durable"],
                    "auto_delete": False,
                    "internal": False,
                    "arguments": {},
                }
            )
            res.repairs.append("exchange")
        elif found.get("type") != e["type"] or bool(found.get("durable")) != bool(e["durable"]):
            res.mismatches.append(
                f"exchange {e['name']!r} exists with type={found.get('type')} "
                f"durable={found.get('durable')}, "
                f"the spec says type={e['type']} durable={e['durable']}; delete it on the broker to change it"
            )
    for x in want.queues:
        found = queues.get(x["name"])
        if found is None:
            declare["queues"].append(
                {
                    "name": x["name"],
                    "vhost": vh,
                    "durable": x["durable"],
                    "auto_delete": False,
                    "arguments": {"x-queue-type": x["type"]},
                }
            )
            res.repairs.append("queue")
        elif _queue_type(found) != x["type"] or bool(found.get("durable")) != bool(x["durable"]):
            res.mismatches.append(
                f"queue {x['name']!r} exists as type={_queue_type(found)} durable={found.get('durable')}, "
                f"the spec says type={x['type']} durable={x['durable']}; delete it on the broker to change it"
            )
    for name, pol in want.policies.items():
        found = policies.get(name)
        if found is None or any(
            found.get(k) != pol[k] for k in ("pattern", "apply-to", "priority", "definition")
        ):
            declare["policies"].append({"name": name, "vhost": vh, **pol})
            res.repairs.append("policy")
    mismatched = {m.split("'")[1] for m in res.mismatches}
    for b in want.bindings:
        if binding_key(b) not in bindings and b["destination"] not in mismatched:
            declare["bindings"].append(
                {
                    "source": b["source"],
                    "vhost": vh,
                    "destination": b["destination"],
                    "destination_type": b["destinationType"],
                    "routing_key": b["routingKey"],
                    "arguments": {},
                }
            )
            res.repairs.append("binding")
    return {k: v for k, v in declare.items() if v}, res


async def apply_topology(
    api: RabbitAdmin,
    want: DesiredTopology,
    observed: ObservedTopology,
    declare: dict[str, list],
    res: TopologyResult,
    previous: dict[str, list],
    allow_queue_delete: bool,
    shared_exchanges: frozenset[str] = frozenset(),
) -> None:
    """Declare (one call, when anything is missing), then prune what the previous spec had and this one
    does not (rare: one listing per type); pruned queues kept are added to res.retained."""
    vh = want.vhost
    have = observed.definitions
    queues = {x["name"]: x for x in have.get("queues") or []}
    exchanges = {e["name"]: e for e in have.get("exchanges") or []}
    policies = {p["name"]: p for p in have.get("policies") or []}
    if declare:
        await api.post_global_definitions(declare)

    # Pruning of what an earlier spec declared and this one does not (rare: one listing per type).
    want_bindings = {binding_key(b) for b in want.bindings}
    gone = [b for b in previous.get("bindings", []) if binding_key(b) not in want_bindings]
    if gone:
        listed = {observed_binding_key(b): b for b in await api.list_bindings(vh) if b.get("source")}
        for b in gone:
            found = listed.get(binding_key(b))
            if found:
                await api.delete_binding(vh, b, found["properties_key"])
    for name in previous.get("policies", []):
        if name not in want.policies and name in policies:
            await api.delete_policy(vh, name)
    want_queues = {x["name"] for x in want.queues}
    pruned = [n for n in previous.get("queues", []) if n not in want_queues and n in queues]
    if pruned:
        counts = {x["name"]: x.get("messages") for x in await api.list_queues(vh)}
        for name in pruned:
            if allow_queue_delete and not counts.get(name):
                await api.delete_queue(vh, name)
            else:
                res.retained.append(name)
    want_exchanges = {e["name"] for e in want.exchanges}
    for name in previous.get("exchanges", []):
        if name not in want_exchanges and name in exchanges and name not in shared_exchanges:
            await api.delete_exchange(vh, name)


def applied_record(want: DesiredTopology) -> dict[str, list]:
    """What this spec put on the broker, kept in status so a later spec can prune it."""
    return {
        "exchanges": sorted(e["name"] for e in want.exchanges),
        "queues": sorted(x["name"] for x in want.queues),
        "bindings": [
            {
                "source": b["source"],
                "destination": b["destination"],
                "destinationType": b["destinationType"],
                "routingKey": b["routingKey"],
            }
            for b in want.bindings
        ],
        "policies": sorted(want.policies),
    }
