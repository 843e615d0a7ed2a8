"""Declare a service's RabbitMQ topology file (``charts/<svc>/files/rabbit-topology.yaml``) on a broker.

For tests and local runs: the same file the chart hands to the operator, declared here with the
management API as an administrator, with the operator's semantics (docs/contracts.md):
- exchanges as listed; queues with their ``type`` as the only queue argument (immutable);
- tunables (dead-letter exchange and routing key, message TTL, max length, delivery limit) in a policy per
  queue named ``<queue>.tunables``, so they can change without redeclaring the queue;
- the ``deadLetter`` shorthand declares its exchange (topic) and queue, bound with ``#``;
- the service user with exactly the file's permissions (services never configure anything themselves).
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml


def load_topology(path: str | Path) -> dict[str, Any]:
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a topology spec must be a mapping")
    return spec


def _q(value: str) -> str:
    return quote(value, safe="")


class TopologyDeclarer:
    """Management-API client (admin credentials) that declares topology specs."""

    def __init__(self, management_url: str, admin_user: str, admin_password: str, vhost: str = "/") -> None:
        self.vhost = vhost
        self.client = httpx.Client(base_url=management_url, auth=(admin_user, admin_password), timeout=10)

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = self.client.request(method, path, json=body)
        response.raise_for_status()
        return response.json() if response.content else None

    def declare(self, spec: dict[str, Any], password: str | None = None) -> tuple[str, str]:
        """Declare everything in ``spec``; returns the service user's (name, password)."""
        v = _q(self.vhost)
        self._call("PUT", f"/api/vhosts/{v}", {})
        for exchange in spec.get("exchanges") or []:
            self._call(
                "PUT",
                f"/api/exchanges/{v}/{_q(exchange['name'])}",
                {
                    "type": exchange.get("type", "topic"),
                    "durable": exchange.get("durable", True),
                    "auto_delete": False,
                    "arguments": {},
                },
            )
        dead_letter = spec.get("deadLetter")
        if dead_letter:
            self._call(
                "PUT",
                f"/api/exchanges/{v}/{_q(dead_letter['exchange'])}",
                {"type": "topic", "durable": True, "auto_delete": False, "arguments": {}},
            )
            self._call(
                "PUT",
                f"/api/queues/{v}/{_q(dead_letter['queue'])}",
                {"durable": True, "auto_delete": False, "arguments": {}},
            )
            self._bind(dead_letter["exchange"], dead_letter["queue"], "queue", "#")
        for queue in spec.get("queues") or []:
            self._call(
                "PUT",
                f"/api/queues/{v}/{_q(queue['name'])}",
                {
                    "durable": queue.get("durable", True),
                    "auto_delete": False,
                    "arguments": {"x-queue-type": queue.get("type", "quorum")},
                },
            )
            definition: dict[str, Any] = {}
            if queue.get("deadLetter"):
                definition["dead-letter-exchange"] = queue["deadLetter"]["exchange"]
                if queue["deadLetter"].get("routingKey"):
                    definition["dead-letter-routing-key"] = queue["deadLetter"]["routingKey"]
            for key, policy_key in (
                ("messageTtl", "message-ttl"),
                ("maxLength", "max-length"),
                ("deliveryLimit", "delivery-limit"),
            ):
                if queue.get(key) is not None:
                    definition[policy_key] = queue[key]
            if definition:
                self._call(
                    "PUT",
                    f"/api/policies/{v}/{_q(queue['name'] + '.tunables')}",
                    {
                        "pattern": f"^{re.escape(queue['name'])}$",
                        "definition": definition,
                        "apply-to": "queues",
                        "priority": 10,
                    },
                )
        for binding in spec.get("bindings") or []:
            self._bind(
                binding["source"],
                binding["destination"],
                binding.get("destinationType", "queue"),
                binding.get("routingKey", ""),
            )
        user = spec.get("user") or {}
        name = user.get("name") or spec.get("name") or "service"
        password = password or secrets.token_urlsafe(16)
        self._call("PUT", f"/api/users/{_q(name)}", {"password": password, "tags": ""})
        permissions = user.get("permissions") or {}
        self._call(
            "PUT",
            f"/api/permissions/{v}/{_q(name)}",
            {
                "configure": permissions.get("configure", "^$"),
                "write": permissions.get("write", "^$"),
                "read": permissions.get("read", "^$"),
            },
        )
        return name, password

    def _bind(self, source: str, destination: str, destination_type: str, routing_key: str) -> None:
        kind = "q" if destination_type == "queue" else "e"
        self._call(
            "POST",
            f"/api/bindings/{_q(self.vhost)}/e/{_q(source)}/{kind}/{_q(destination)}",
            {"routing_key": routing_key, "arguments": {}},
        )

    def purge(self, queue: str) -> None:
        self._call("DELETE", f"/api/queues/{_q(self.vhost)}/{_q(queue)}/contents")

    def queue_info(self, queue: str) -> dict[str, Any]:
        return self._call("GET", f"/api/queues/{_q(self.vhost)}/{_q(queue)}")


def declare_topology_file(
    path: str | Path,
    management_url: str,
    admin_user: str,
    admin_password: str,
    *,
    vhost: str = "/",
    password: str | None = None,
) -> tuple[str, str]:
    """Declare the topology file at ``path``; returns the service user's (name, password)."""
    declarer = TopologyDeclarer(management_url, admin_user, admin_password, vhost)
    try:
        return declarer.declare(load_topology(path), password)
    finally:
        declarer.close()
