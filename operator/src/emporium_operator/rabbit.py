"""RabbitMQ management API client (httpx) and pure topology planning (policies, bindings, permissions).

Every name goes into URL paths percent-encoded with safe='' so no vhost, queue or exchange name can
escape its path segment (a vhost called "../" is just a vhost)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

POLICY_PREFIX = "emporium-queue."
POLICY_PRIORITY = 100
# Statistics-free reads: the management stats DB lags behind (and on some versions crashes for a vhost
# created a moment ago), while the operator needs only definitions and message totals.
NO_STATS = {"disable_stats": "true"}


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

    @property
    def policies(self) -> dict[str, dict[str, Any]]:
        return {policy_name(qu["name"]): p for qu in self.queues if (p := queue_policy(qu))}


def desired_topology(spec: dict[str, Any], name: str, password: str) -> DesiredTopology:
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
    return DesiredTopology(spec["vhost"], user, password, perms, exchanges, queues, unique)


# --- HTTP client ---------------------------------------------------------------------------------


class RabbitAdmin:
    def __init__(self, url: str, user: str, password: str, timeout: float = 10, verify: bool = True):
        self.client = httpx.AsyncClient(
            base_url=url.rstrip("/") + "/api", auth=(user, password), timeout=timeout, verify=verify
        )

    async def __aenter__(self) -> RabbitAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Clients are shared per server (one connection pool, one TLS context); aclose() ends them."""

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _call(
        self, method: str, path: str, body: Any = None, params: dict | None = None, missing_ok: bool = False
    ) -> Any:
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

    async def put_vhost(self, vhost: str, description: str = "") -> None:
        await self._call("PUT", f"/vhosts/{q(vhost)}", {"description": description})

    async def delete_vhost(self, vhost: str) -> None:
        await self._call("DELETE", f"/vhosts/{q(vhost)}", missing_ok=True)

    async def get_user(self, user: str) -> dict | None:
        return await self._call("GET", f"/users/{q(user)}", missing_ok=True)

    async def put_user(self, user: str, password: str) -> None:
        await self._call(
            "PUT",
            f"/users/{q(user)}",
            {
                "password_hash": password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": "",
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
    warnings: list[str] = field(default_factory=list)


async def ensure_topology(
    api: RabbitAdmin,
    want: DesiredTopology,
    previous: dict[str, list],
    allow_queue_delete: bool,
    shared_exchanges: frozenset[str] = frozenset(),
) -> TopologyResult:
    """Observe the vhost once per entity type, create what is missing, prune what the previous spec had."""
    res = TopologyResult()
    vh = want.vhost
    user = await api.get_user(want.user)
    if user is None or not password_matches(user.get("password_hash"), want.password):
        await api.put_user(want.user, want.password)
        res.repairs.append("user" if user is None else "password")
    perms = await api.get_permissions(vh, want.user)
    if not perms or any(perms.get(k) != want.permissions[k] for k in ("configure", "write", "read")):
        await api.put_permissions(vh, want.user, want.permissions)
        res.repairs.append("permission")

    exchanges = {e["name"]: e for e in await api.list_exchanges(vh)}
    for e in want.exchanges:
        have = exchanges.get(e["name"])
        if have is None:
            await api.put_exchange(vh, e)
            res.repairs.append("exchange")
        elif have.get("type") != e["type"] or bool(have.get("durable")) != bool(e["durable"]):
            res.warnings.append(
                f"exchange {e['name']!r} exists with type={have.get('type')} "
                f"durable={have.get('durable')}; delete it to change these"
            )
    queues = {x["name"]: x for x in await api.list_queues(vh)}
    for x in want.queues:
        have = queues.get(x["name"])
        if have is None:
            await api.put_queue(vh, x)
            res.repairs.append("queue")
        elif have.get("type") != x["type"]:
            res.warnings.append(f"queue {x['name']!r} exists as {have.get('type')}, spec says {x['type']}")
    policies = {p["name"]: p for p in await api.list_policies(vh)}
    for name, pol in want.policies.items():
        have = policies.get(name)
        if have is None or any(
            have.get(k) != pol[k] for k in ("pattern", "apply-to", "priority", "definition")
        ):
            await api.put_policy(vh, name, pol)
            res.repairs.append("policy")
    bindings = {observed_binding_key(b): b for b in await api.list_bindings(vh) if b.get("source")}
    for b in want.bindings:
        if binding_key(b) not in bindings:
            await api.post_binding(vh, b)
            res.repairs.append("binding")

    # Pruning of what an earlier spec declared and this one does not.
    want_bindings = {binding_key(b) for b in want.bindings}
    for b in previous.get("bindings", []):
        key = binding_key(b)
        if key not in want_bindings and key in bindings:
            await api.delete_binding(vh, b, bindings[key]["properties_key"])
    for name in previous.get("policies", []):
        if name not in want.policies:
            await api.delete_policy(vh, name)
    want_queues = {x["name"] for x in want.queues}
    for name in previous.get("queues", []):
        if name in want_queues or name not in queues:
            continue
        if allow_queue_delete and not queues[name].get("messages"):
            await api.delete_queue(vh, name)
        else:
            res.retained.append(name)
    want_exchanges = {e["name"] for e in want.exchanges}
    for name in previous.get("exchanges", []):
        if name not in want_exchanges and name in exchanges and name not in shared_exchanges:
            await api.delete_exchange(vh, name)
    return res


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
