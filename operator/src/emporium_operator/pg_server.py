"""PostgresServer: how to reach a server; Ready when the admin credentials work. Other kinds find it here."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from . import postgres
from .common import NotReady, Outcome, unreachable
from .engine import referenced_server
from .kube import KUBE
from .secrets import decode_data

KIND, PLURAL = "PostgresServer", "postgresservers"


# Admin Secrets as last read: (monotonic time, the Secret or None). A burst of reconciles against one
# server reads it once per ADMIN_SECRET_TTL instead of once per reconcile; a changed Secret is seen within it.
ADMIN_SECRET_TTL = 1.0
_admin_secrets: dict[str, tuple[float, dict[str, Any] | None]] = {}


async def _admin_secret(path: str) -> dict[str, Any] | None:
    now = time.monotonic()
    cached = _admin_secrets.get(path)
    if cached is not None and now - cached[0] < ADMIN_SECRET_TTL:
        return cached[1]
    secret = await KUBE.get(path)
    _admin_secrets[path] = (now, secret)
    return secret


def forget_admin_secrets() -> None:
    _admin_secrets.clear()


async def admin_credentials(server: dict[str, Any], kind: str, waits_for: tuple) -> tuple[str, str]:
    """The admin Secret, read in the server's own namespace (tenants never hold a copy)."""
    namespace = server["metadata"]["namespace"]
    ref = server["spec"]["adminSecretRef"]
    secret = await _admin_secret(KUBE.secret_path(namespace, ref["name"]))
    if secret is None:
        raise NotReady(
            "AdminSecretMissing", f"{kind} admin Secret {ref['name']!r} not found in {namespace}", waits_for
        )
    data = decode_data(secret)
    ukey, pkey = ref.get("usernameKey", "username"), ref.get("passwordKey", "password")
    if ukey not in data or pkey not in data:
        raise NotReady(
            "AdminSecretInvalid", f"admin Secret {ref['name']!r} needs keys {ukey!r} and {pkey!r}", waits_for
        )
    return data[ukey], data[pkey]


async def connection(server: dict[str, Any]) -> postgres.ServerConn:
    key = (PLURAL, server["metadata"]["namespace"], server["metadata"]["name"])
    user, password = await admin_credentials(server, KIND, key)
    spec = server["spec"]
    return postgres.ServerConn(
        host=spec["host"],
        port=int(spec.get("port", 5432)),
        user=user,
        password=password,
        admin_database=spec.get("adminDatabase", "postgres"),
        sslmode=spec.get("sslMode", "prefer"),
    )


def error(exc: BaseException, where: str, waits_for: tuple | None = None) -> NotReady:
    if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
        return NotReady("AuthenticationFailed", f"{where}: admin credentials rejected: {exc}", waits_for)
    if unreachable(exc):
        return NotReady(
            "ServerUnreachable", f"{where}: cannot connect: {type(exc).__name__}: {exc}", waits_for
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return NotReady("InsufficientPrivilege", f"{where}: admin role lacks a privilege: {exc}", waits_for)
    return NotReady("ServerError", f"{where}: {type(exc).__name__}: {exc}", waits_for)


async def server_for(body: dict[str, Any]) -> dict[str, Any]:
    """The PostgresServer an object refers to (serverRef), if it lets the object's namespace use it."""
    return await referenced_server(body, PLURAL, "PostgresServer")


def endpoint(server: dict[str, Any] | None) -> str | None:
    if server is None:
        return None
    spec = server["spec"]
    return f"{str(spec.get('host', '')).lower()}:{spec.get('port', 5432)}"


async def reconcile(body: dict[str, Any], out: Outcome) -> str:
    conn = await connection(body)
    key = (PLURAL, body["metadata"]["namespace"], body["metadata"]["name"])
    try:
        version = await postgres.server_version(conn)
    except Exception as e:
        raise error(e, f"{conn.host}:{conn.port}") from e
    out.status["version"] = version
    out.reason = "Connected"
    out.provides = key
    return f"PostgreSQL {version} reachable at {conn.host}:{conn.port}"
