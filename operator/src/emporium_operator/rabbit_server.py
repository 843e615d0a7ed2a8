"""RabbitServer: how to reach a broker's management API; one HTTP client per server, shared by every
reconcile. Other kinds find it here."""

from __future__ import annotations

import os
from typing import Any

import httpx

from . import rabbit
from .common import NotReady, Outcome
from .engine import referenced_server
from .pg_server import admin_credentials

KIND, PLURAL = "RabbitServer", "rabbitservers"
CONCURRENCY = int(os.environ.get("EMPORIUM_RABBIT_CONCURRENCY", "4"))

_clients: dict[tuple[str, str, str, bool], rabbit.RabbitAdmin] = {}


def key_of(server: dict[str, Any]) -> tuple[str, str, str]:
    return (PLURAL, server["metadata"]["namespace"], server["metadata"]["name"])


async def api_for(server: dict[str, Any]) -> tuple[rabbit.RabbitAdmin, str]:
    """The server's management API client (one connection pool per server and credentials) and the admin
    user name."""
    user, password = await admin_credentials(server, KIND, key_of(server))
    spec = server["spec"]
    verify = not (spec.get("tls") or {}).get("insecureSkipVerify", False)
    key = (spec["managementUrl"], user, password, verify)
    api = _clients.get(key)
    if api is None:
        for old in [k for k in _clients if k[0] == key[0]]:  # credentials rotated: drop the old client
            await _clients.pop(old).aclose()
        api = _clients[key] = rabbit.RabbitAdmin(
            spec["managementUrl"], user, password, verify=verify, concurrency=CONCURRENCY
        )
    return api, user


def forget_clients() -> None:
    _clients.clear()


async def close_clients() -> None:
    while _clients:
        await _clients.popitem()[1].aclose()


def error(exc: BaseException, where: str, waits_for: tuple | None = None) -> NotReady:
    if isinstance(exc, rabbit.RabbitError) and exc.status == 401:
        return NotReady("AuthenticationFailed", f"{where}: admin credentials rejected", waits_for)
    if isinstance(exc, httpx.TransportError | OSError):
        return NotReady(
            "ServerUnreachable",
            f"{where}: cannot reach the management API: {type(exc).__name__}: {exc}",
            waits_for,
        )
    return NotReady("ServerError", f"{where}: {exc}", waits_for)


async def server_for(body: dict[str, Any]) -> dict[str, Any]:
    """The RabbitServer an object refers to (serverRef), if it lets the object's namespace use it."""
    return await referenced_server(body, PLURAL, "RabbitServer")


def endpoint(server: dict[str, Any] | None) -> str | None:
    return str(server["spec"].get("managementUrl")) if server else None


async def reconcile(body: dict[str, Any], out: Outcome) -> str:
    api, _user = await api_for(body)
    url = body["spec"]["managementUrl"]
    try:
        overview = await api.overview()
    except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
        raise error(e, url) from e
    out.status["version"] = overview.get("rabbitmq_version")
    out.status["clusterName"] = overview.get("cluster_name")
    out.reason = "Connected"
    out.provides = key_of(body)
    return f"RabbitMQ {out.status['version']} reachable at {url}"
