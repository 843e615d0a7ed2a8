"""Kopf handlers: one idempotent reconcile per kind (create, update, resume and a jittered drift timer).

Run: ``kopf run -m emporium_operator.main --all-namespaces --liveness=http://0.0.0.0:8080/healthz``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import kopf

from . import metrics, postgres, rabbit
from .conditions import get_condition, now_iso, remove_condition, set_condition
from .kube import KUBE
from .secrets import (
    MANAGED_LABEL,
    amqp_uri,
    decode_data,
    generate_password,
    parse_duration,
    postgres_uri,
    secret_manifest,
)

GROUP, VERSION = "emporium.dev", "v1alpha1"
INTERVAL = float(os.environ.get("EMPORIUM_RECONCILE_INTERVAL", "300"))  # drift check period (seconds)
IDLE = float(os.environ.get("EMPORIUM_TIMER_IDLE", str(min(30.0, INTERVAL))))
RETRY_DELAY = float(os.environ.get("EMPORIUM_RETRY_DELAY", "30"))  # dependency-not-ready retry
FORCE_DELETE = "emporium.dev/force-delete"

log = logging.getLogger("emporium_operator")


class NotReady(Exception):
    """A dependency is not ready (server down, vhost missing): Ready=False and a retry."""

    def __init__(self, reason: str, message: str, delay: float | None = None):
        super().__init__(message)
        self.reason, self.message, self.delay = reason, message, delay or RETRY_DELAY


class Refused(Exception):
    """The spec cannot be applied as is (InvalidSpec, Conflict): Ready=False, no retry until it changes."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# --- startup, login, liveness ------------------------------------------------------------------


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "emporium.dev/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="emporium.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="emporium.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 4
    settings.queueing.error_delays = [1, 2, 5, 10, 20, 30, 60]
    # Only our own Secrets are streamed from the API server (server-side label selector).
    settings.watching.label_selectors["secrets"] = f"{MANAGED_LABEL}=true"
    logging.getLogger("httpx").setLevel(logging.WARNING)
    metrics.serve()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    KUBE.set_info(info)
    return info


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    await KUBE.close()
    while _rabbit_clients:
        await _rabbit_clients.popitem()[1].aclose()


@kopf.on.probe(id="reconciles")
def probe(**_: Any) -> int:
    # Reports, never fails on external systems: a down broker must not restart the operator.
    return len(_locks)


# --- shared reconcile machinery -----------------------------------------------------------------

_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)


def _ready_reason(status: dict[str, Any]) -> str | None:
    c = get_condition(status.get("conditions"), "Ready")
    return c.get("reason") if c else None


async def run_reconcile(
    kind: str,
    body: kopf.Body,
    patch: kopf.Patch,
    work: Callable[[dict[str, Any]], Awaitable[str]],
    retry: bool = True,
) -> None:
    """Run work(new_status) under a per-object lock; translate outcomes into conditions and metrics.

    work fills new_status with kind-specific fields and returns the Ready message."""
    uid = body["metadata"]["uid"]
    generation = body["metadata"].get("generation")
    status = dict(body.get("status") or {})
    conditions = status.get("conditions") or []
    new: dict[str, Any] = {}
    async with _locks[uid]:
        with metrics.timed(kind):
            try:
                message = await work(new)
            except NotReady as e:
                _fail(kind, body, patch, conditions, generation, e.reason, e.message)
                if retry:
                    raise kopf.TemporaryError(e.message, delay=e.delay) from None
                return
            except Refused as e:
                _fail(kind, body, patch, conditions, generation, e.reason, e.message, e.reason)
                return
            except (kopf.TemporaryError, kopf.PermanentError):
                raise
            except Exception as e:
                _fail(kind, body, patch, conditions, generation, "ReconcileError", f"{type(e).__name__}: {e}")
                if retry:
                    raise kopf.TemporaryError(str(e), delay=RETRY_DELAY) from e
                return
    conditions = remove_condition(conditions, "Conflict")
    conditions = set_condition(conditions, "Ready", True, new.pop("_reason", "Ready"), message, generation)
    patch.status["conditions"] = conditions
    patch.status["observedGeneration"] = generation
    for key, value in new.items():
        patch.status[key] = value
    metrics.RECONCILE_TOTAL.labels(kind=kind, result="ok").inc()


def _fail(kind, body, patch, conditions, generation, reason, message, extra_type=None) -> None:
    previous = _ready_reason(body.get("status") or {})
    conditions = set_condition(conditions, "Ready", False, reason, message, generation)
    if extra_type == "Conflict":
        conditions = set_condition(conditions, "Conflict", True, reason, message, generation)
    patch.status["conditions"] = conditions
    patch.status["observedGeneration"] = generation
    result = {"InvalidSpec": "invalid", "Conflict": "conflict", "ReconcileError": "error"}.get(
        reason, "not_ready"
    )
    metrics.RECONCILE_TOTAL.labels(kind=kind, result=result).inc()
    metrics.RECONCILE_ERRORS.labels(kind=kind, reason=reason).inc()
    if previous != reason:  # an Event per transition, not per retry
        kopf.warn(body, reason=reason, message=message)


def _is_drift(body: kopf.Body) -> bool:
    """Changes needed while the object was Ready at its current generation are drift repairs."""
    status = body.get("status") or {}
    ready = get_condition(status.get("conditions"), "Ready")
    return bool(
        ready
        and ready.get("status") == "True"
        and status.get("observedGeneration") == body["metadata"].get("generation")
    )


def _count_drift(kind: str, body: kopf.Body, objects: list[str], new: dict[str, Any]) -> None:
    if objects and _is_drift(body):
        for obj in objects:
            metrics.DRIFT_REPAIRS.labels(kind=kind, object=obj).inc()
        new["driftRepairs"] = int((body.get("status") or {}).get("driftRepairs") or 0) + len(objects)
        new["lastDriftRepair"] = {"time": now_iso(), "objects": sorted(set(objects))}
        kopf.info(
            body, reason="DriftRepaired", message=f"recreated or reset: {', '.join(sorted(set(objects)))}"
        )


def _jitter(**_: Any) -> float:
    return random.uniform(0, INTERVAL)  # noqa: S311 - spreading timers, not security


async def _read_secret(namespace: str, name: str) -> dict[str, Any] | None:
    return await KUBE.get(KUBE.secret_path(namespace, name))


async def _admin_credentials(namespace: str, ref: dict[str, Any], kind: str) -> tuple[str, str]:
    secret = await _read_secret(namespace, ref["name"])
    if secret is None:
        raise NotReady("AdminSecretMissing", f"{kind} admin Secret {ref['name']!r} not found in {namespace}")
    data = decode_data(secret)
    ukey, pkey = ref.get("usernameKey", "username"), ref.get("passwordKey", "password")
    if ukey not in data or pkey not in data:
        raise NotReady("AdminSecretInvalid", f"admin Secret {ref['name']!r} needs keys {ukey!r} and {pkey!r}")
    return data[ukey], data[pkey]


async def _write_secret(body: kopf.Body, name: str, data: dict[str, str], current: dict | None) -> bool:
    """Apply the Secret when its data differ; refuses to take over a Secret that is not ours."""
    namespace = body["metadata"]["namespace"]
    if current is not None:
        owners = current["metadata"].get("ownerReferences") or []
        if not any(o.get("uid") == body["metadata"]["uid"] for o in owners):
            raise Refused("Conflict", f"Secret {name!r} exists and is not owned by this {body['kind']}")
        if (
            decode_data(current) == data
            and (current["metadata"].get("labels") or {}).get(MANAGED_LABEL) == "true"
        ):
            return False
    await KUBE.apply(KUBE.secret_path(namespace, name), secret_manifest(name, namespace, body, data))
    return True


def _claim(meta: Any, namespace: str, server: str | None) -> tuple[str, str, str, str | None]:
    return (meta.get("creationTimestamp") or "", namespace, meta["name"], server)


def _claim_winner(
    claims: Any, namespace: str, name: str, endpoint_of: Callable[[str, str | None], str | None]
) -> str | None:
    """Claims are (creationTimestamp, namespace, name, server) for one database, role, vhost or user name,
    from every namespace. Rivals are claims whose server object points at the same physical server as
    mine; the earliest wins. Returns "namespace/name" of the winner when it is not me."""
    mine = endpoint_of(namespace, next((c[3] for c in claims if c[1:3] == (namespace, name)), None))
    if mine is None:
        return None
    rivals = sorted(c for c in claims if endpoint_of(c[1], c[3]) == mine)
    if rivals and rivals[0][1:3] != (namespace, name):
        return f"{rivals[0][1]}/{rivals[0][2]}"
    return None


def _endpoint(index: Any, key: str) -> Callable[[str, str | None], str | None]:
    def endpoint_of(namespace: str, server: str | None) -> str | None:
        found = list(index.get((namespace, server), []))
        return (
            str(found[0]["spec"].get(key) if key != "pg" else _pg_endpoint(found[0]["spec"]))
            if found
            else None
        )

    return endpoint_of


def _pg_endpoint(spec: dict[str, Any]) -> str:
    return f"{str(spec.get('host', '')).lower()}:{spec.get('port', 5432)}"


def _unreachable(exc: BaseException) -> bool:
    return isinstance(
        exc, OSError | asyncio.TimeoutError | asyncpg.CannotConnectNowError | httpx.TransportError
    )


# --- PostgresServer ----------------------------------------------------------------------------

PG_SERVER = (GROUP, VERSION, "postgresservers")
PG_DB = (GROUP, VERSION, "postgresdatabases")


@kopf.index(*PG_SERVER)
def pg_servers(namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict:
    return {(namespace, name): {"spec": dict(spec), "deleting": bool(meta.get("deletionTimestamp"))}}


async def _pg_conn(namespace: str, spec: dict[str, Any]) -> postgres.ServerConn:
    user, password = await _admin_credentials(namespace, spec["adminSecretRef"], "PostgresServer")
    return postgres.ServerConn(
        host=spec["host"],
        port=int(spec.get("port", 5432)),
        user=user,
        password=password,
        admin_database=spec.get("adminDatabase", "postgres"),
        sslmode=spec.get("sslMode", "prefer"),
    )


def _pg_error(exc: BaseException, where: str) -> NotReady:
    if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
        return NotReady("AuthenticationFailed", f"{where}: admin credentials rejected: {exc}")
    if _unreachable(exc):
        return NotReady("ServerUnreachable", f"{where}: cannot connect: {type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return NotReady("InsufficientPrivilege", f"{where}: admin role lacks a privilege: {exc}")
    return NotReady("ServerError", f"{where}: {type(exc).__name__}: {exc}")


async def _reconcile_pg_server(body, spec, namespace, patch, retry=True) -> None:
    async def work(new: dict[str, Any]) -> str:
        conn = await _pg_conn(namespace, dict(spec))
        try:
            version = await postgres.server_version(conn)
        except Exception as e:
            raise _pg_error(e, f"{conn.host}:{conn.port}") from e
        new["version"] = version
        new["_reason"] = "Connected"
        return f"PostgreSQL {version} reachable at {conn.host}:{conn.port}"

    await run_reconcile("PostgresServer", body, patch, work, retry)


@kopf.on.resume(*PG_SERVER)
@kopf.on.create(*PG_SERVER)
@kopf.on.update(*PG_SERVER)
async def pg_server_changed(body, spec, namespace, patch, **_: Any) -> None:
    await _reconcile_pg_server(body, spec, namespace, patch)


@kopf.timer(*PG_SERVER, interval=INTERVAL, initial_delay=_jitter, idle=IDLE)
async def pg_server_timer(body, spec, namespace, patch, **_: Any) -> None:
    await _reconcile_pg_server(body, spec, namespace, patch, retry=False)


# --- PostgresDatabase ---------------------------------------------------------------------------


def _db_names(name: str, spec: dict[str, Any]) -> tuple[str, str, str]:
    dbname = spec.get("databaseName") or name
    return dbname, spec.get("owner") or f"{dbname}_owner", spec.get("secretName") or f"{name}-db"


@kopf.index(*PG_DB)
def pg_claims(namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict:
    dbname, owner, _secret = _db_names(name, dict(spec))
    server = (spec.get("serverRef") or {}).get("name")
    claim = _claim(meta, namespace, server)
    return {("db", dbname): claim, ("role", owner): claim}


def _pg_conflict(namespace: str, name: str, spec: dict[str, Any], claims: Any, servers: Any) -> str | None:
    dbname, owner, _ = _db_names(name, spec)
    server = spec["serverRef"]["name"]
    for key, what in ((("db", dbname), f"database {dbname!r}"), (("role", owner), f"role {owner!r}")):
        winner = _claim_winner(claims.get(key, []), namespace, name, _endpoint(servers, "pg"))
        if winner:
            return f"{what} on server {server!r} is already claimed by PostgresDatabase {winner!r}"
    return None


def _rotation_due(spec: dict[str, Any], status: dict[str, Any], now: dt.datetime) -> tuple[bool, str | None]:
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


async def _reconcile_pg_db(body, spec, name, namespace, patch, pg_servers, pg_claims, retry=True) -> None:
    spec = dict(spec)
    status = dict(body.get("status") or {})

    async def work(new: dict[str, Any]) -> str:
        dbname, owner, secret_name = _db_names(name, spec)
        try:
            postgres.quote_ident(dbname)
            postgres.quote_ident(owner)
            for ext in spec.get("extensions") or []:
                postgres.quote_ident(ext)
            parse_duration((spec.get("passwordRotation") or {}).get("interval"))
        except ValueError as e:
            raise Refused("InvalidSpec", str(e)) from e
        if dbname in postgres.RESERVED_DATABASES:
            raise Refused("InvalidSpec", f"database name {dbname!r} is reserved")
        conflict = _pg_conflict(namespace, name, spec, pg_claims, pg_servers)
        if conflict:
            raise Refused("Conflict", conflict)
        server_name = spec["serverRef"]["name"]
        servers = list(pg_servers.get((namespace, server_name), []))
        if not servers:
            raise NotReady("ServerNotFound", f"PostgresServer {server_name!r} not found in {namespace}")
        server_spec = servers[0]["spec"]
        conn = await _pg_conn(namespace, server_spec)
        current = await _read_secret(namespace, secret_name)
        existing = decode_data(current).get("password")
        now = dt.datetime.now(dt.UTC)
        rotate, trigger = _rotation_due(spec, status, now)
        password = existing or generate_password()
        rotated = bool(existing and rotate)
        if rotated:
            password = generate_password()
        desired = postgres.DesiredDatabase(dbname, owner, password, tuple(spec.get("extensions") or ()))
        try:
            steps = await postgres.ensure(conn, desired)
        except (TimeoutError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
            if isinstance(e, asyncpg.UndefinedFileError | asyncpg.FeatureNotSupportedError):
                raise Refused("InvalidSpec", f"extension cannot be installed: {e}") from e
            raise _pg_error(e, f"{conn.host}:{conn.port}") from e
        uri = postgres_uri(owner, password, conn.host, conn.port, dbname, conn.sslmode)
        data = {
            "uri": uri,
            "DATABASE_URL": uri,
            "host": conn.host,
            "port": str(conn.port),
            "dbname": dbname,
            "username": owner,
            "password": password,
        }
        await _write_secret(body, secret_name, data, current)
        objects = [s.obj for s in steps if not (rotated and s.obj == "password")]
        _count_drift("PostgresDatabase", body, objects, new)
        new.update(
            {"databaseName": dbname, "username": owner, "secretName": secret_name, "server": server_name}
        )
        if trigger:
            new["rotationTrigger"] = trigger
        if rotated or not status.get("passwordRotatedAt") or not existing:
            new["passwordRotatedAt"] = now_iso()
        new["_reason"] = "Provisioned"
        return f"database {dbname!r} owned by {owner!r}; credentials in Secret {secret_name!r}"

    await run_reconcile("PostgresDatabase", body, patch, work, retry)


@kopf.on.resume(*PG_DB)
@kopf.on.create(*PG_DB)
@kopf.on.update(*PG_DB)
async def pg_db_changed(body, spec, name, namespace, patch, pg_servers, pg_claims, **_: Any) -> None:
    await _reconcile_pg_db(body, spec, name, namespace, patch, pg_servers, pg_claims)


@kopf.timer(*PG_DB, interval=INTERVAL, initial_delay=_jitter, idle=IDLE)
async def pg_db_timer(body, spec, name, namespace, patch, pg_servers, pg_claims, **_: Any) -> None:
    await _reconcile_pg_db(body, spec, name, namespace, patch, pg_servers, pg_claims, retry=False)


def _blocked(patch: kopf.Patch, body: kopf.Body, reason: str, message: str) -> kopf.TemporaryError:
    conditions = set_condition(
        (body.get("status") or {}).get("conditions"), "DeletionBlocked", True, reason, message
    )
    patch.status["conditions"] = conditions
    if _ready_reason(body.get("status") or {}) != reason:
        kopf.warn(body, reason="DeletionBlocked", message=message)
    return kopf.TemporaryError(message, delay=RETRY_DELAY)


@kopf.on.delete(*PG_DB)
async def pg_db_deleted(
    body, spec, name, namespace, meta, patch, pg_servers, pg_claims, logger, **_: Any
) -> None:
    spec = dict(spec)
    if spec.get("reclaimPolicy", "Retain") != "Delete":
        logger.info("reclaimPolicy Retain: database left in place")
        return
    if _pg_conflict(namespace, name, spec, pg_claims, pg_servers):
        return  # never drop what another object owns
    servers = list(pg_servers.get((namespace, spec["serverRef"]["name"]), []))
    if not servers or servers[0]["deleting"]:
        logger.warning("PostgresServer is gone: releasing without dropping the database")
        return
    if (meta.get("annotations") or {}).get(FORCE_DELETE) == "true":
        logger.warning("force-delete annotation: releasing without dropping the database")
        return
    dbname, owner, _ = _db_names(name, spec)
    try:
        conn = await _pg_conn(namespace, servers[0]["spec"])
    except NotReady:
        logger.warning("admin Secret is gone: releasing without dropping the database")
        return
    try:
        active = await postgres.active_connections(conn, dbname)
        if active:
            raise _blocked(
                patch,
                body,
                "ActiveConnections",
                f"database {dbname!r} has {active} active connection(s); close them to delete it "
                f"(or set reclaimPolicy: Retain)",
            )
        await postgres.drop(conn, dbname, owner)
    except asyncpg.ObjectInUseError as e:
        raise _blocked(patch, body, "ActiveConnections", f"database {dbname!r} is in use: {e}") from e
    except asyncpg.DependentObjectsStillExistError as e:
        raise _blocked(patch, body, "DependentObjects", f"role {owner!r} owns objects elsewhere: {e}") from e
    except (TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.PostgresError) as e:
        err = _pg_error(e, f"{conn.host}:{conn.port}")
        raise _blocked(
            patch, body, err.reason, err.message + f" (annotate {FORCE_DELETE}=true to release)"
        ) from e


# --- RabbitServer / RabbitVhost / RabbitTopology -------------------------------------------------

RB_SERVER = (GROUP, VERSION, "rabbitservers")
RB_VHOST = (GROUP, VERSION, "rabbitvhosts")
RB_TOPO = (GROUP, VERSION, "rabbittopologies")


@kopf.index(*RB_SERVER)
def rabbit_servers(namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict:
    return {(namespace, name): {"spec": dict(spec), "deleting": bool(meta.get("deletionTimestamp"))}}


_rabbit_clients: dict[tuple[str, str, str, bool], rabbit.RabbitAdmin] = {}


async def _rabbit_api(namespace: str, spec: dict[str, Any]) -> rabbit.RabbitAdmin:
    """One management API client (connection pool) per server and credentials, kept for the process."""
    user, password = await _admin_credentials(namespace, spec["adminSecretRef"], "RabbitServer")
    verify = not (spec.get("tls") or {}).get("insecureSkipVerify", False)
    key = (spec["managementUrl"], user, password, verify)
    api = _rabbit_clients.get(key)
    if api is None:
        for old in [k for k in _rabbit_clients if k[0] == key[0]]:  # credentials rotated: drop the old one
            await _rabbit_clients.pop(old).aclose()
        api = _rabbit_clients[key] = rabbit.RabbitAdmin(spec["managementUrl"], user, password, verify=verify)
    return api


def _rabbit_error(exc: BaseException, where: str) -> NotReady:
    if isinstance(exc, rabbit.RabbitError) and exc.status == 401:
        return NotReady("AuthenticationFailed", f"{where}: admin credentials rejected")
    if isinstance(exc, httpx.TransportError | OSError):
        return NotReady(
            "ServerUnreachable", f"{where}: cannot reach the management API: {type(exc).__name__}: {exc}"
        )
    return NotReady("ServerError", f"{where}: {exc}")


def _server_for(index: Any, namespace: str, name: str) -> dict[str, Any]:
    servers = list(index.get((namespace, name), []))
    if not servers:
        raise NotReady("ServerNotFound", f"RabbitServer {name!r} not found in {namespace}")
    return servers[0]["spec"]


async def _reconcile_rabbit_server(body, spec, namespace, patch, retry=True) -> None:
    async def work(new: dict[str, Any]) -> str:
        async with await _rabbit_api(namespace, dict(spec)) as api:
            try:
                overview = await api.overview()
            except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
                raise _rabbit_error(e, spec["managementUrl"]) from e
        new["version"] = overview.get("rabbitmq_version")
        new["clusterName"] = overview.get("cluster_name")
        new["_reason"] = "Connected"
        return f"RabbitMQ {new['version']} reachable at {spec['managementUrl']}"

    await run_reconcile("RabbitServer", body, patch, work, retry)


@kopf.on.resume(*RB_SERVER)
@kopf.on.create(*RB_SERVER)
@kopf.on.update(*RB_SERVER)
async def rabbit_server_changed(body, spec, namespace, patch, **_: Any) -> None:
    await _reconcile_rabbit_server(body, spec, namespace, patch)


@kopf.timer(*RB_SERVER, interval=INTERVAL, initial_delay=_jitter, idle=IDLE)
async def rabbit_server_timer(body, spec, namespace, patch, **_: Any) -> None:
    await _reconcile_rabbit_server(body, spec, namespace, patch, retry=False)


@kopf.index(*RB_VHOST)
def rabbit_vhost_claims(namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict:
    return {spec.get("name") or name: _claim(meta, namespace, (spec.get("serverRef") or {}).get("name"))}


async def _reconcile_vhost(
    body, spec, name, namespace, patch, rabbit_servers, rabbit_vhost_claims, retry=True
):
    spec = dict(spec)

    async def work(new: dict[str, Any]) -> str:
        vhost = spec.get("name") or name
        server_name = spec["serverRef"]["name"]
        winner = _claim_winner(
            rabbit_vhost_claims.get(vhost, []), namespace, name, _endpoint(rabbit_servers, "managementUrl")
        )
        if winner:
            raise Refused("Conflict", f"vhost {vhost!r} is already claimed by RabbitVhost {winner!r}")
        server = _server_for(rabbit_servers, namespace, server_name)
        admin_user, _pw = await _admin_credentials(namespace, server["adminSecretRef"], "RabbitServer")
        async with await _rabbit_api(namespace, server) as api:
            try:
                repairs = []
                if await api.get_vhost(vhost) is None:
                    await api.put_vhost(vhost, f"managed by emporium-operator ({namespace}/{name})")
                    repairs.append("vhost")
                perms = await api.get_permissions(vhost, admin_user)
                if not perms or perms.get("configure") != ".*":
                    await api.put_permissions(
                        vhost, admin_user, {"configure": ".*", "write": ".*", "read": ".*"}
                    )
            except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
                raise _rabbit_error(e, server["managementUrl"]) from e
        _count_drift("RabbitVhost", body, repairs, new)
        new["vhost"] = vhost
        new["_reason"] = "Provisioned"
        return f"vhost {vhost!r} present"

    await run_reconcile("RabbitVhost", body, patch, work, retry)


@kopf.on.resume(*RB_VHOST)
@kopf.on.create(*RB_VHOST)
@kopf.on.update(*RB_VHOST)
async def vhost_changed(body, spec, name, namespace, patch, rabbit_servers, rabbit_vhost_claims, **_: Any):
    await _reconcile_vhost(body, spec, name, namespace, patch, rabbit_servers, rabbit_vhost_claims)


@kopf.timer(*RB_VHOST, interval=INTERVAL, initial_delay=_jitter, idle=IDLE)
async def vhost_timer(body, spec, name, namespace, patch, rabbit_servers, rabbit_vhost_claims, **_: Any):
    await _reconcile_vhost(
        body, spec, name, namespace, patch, rabbit_servers, rabbit_vhost_claims, retry=False
    )


@kopf.on.delete(*RB_VHOST)
async def vhost_deleted(
    body, spec, name, namespace, meta, patch, rabbit_servers, rabbit_vhost_claims, logger, **_: Any
):
    spec = dict(spec)
    vhost = spec.get("name") or name
    if spec.get("reclaimPolicy", "Retain") != "Delete":
        return
    if _claim_winner(
        rabbit_vhost_claims.get(vhost, []), namespace, name, _endpoint(rabbit_servers, "managementUrl")
    ):
        return
    servers = list(rabbit_servers.get((namespace, spec["serverRef"]["name"]), []))
    if not servers or servers[0]["deleting"] or (meta.get("annotations") or {}).get(FORCE_DELETE) == "true":
        logger.warning("RabbitServer gone or force-delete: releasing without deleting the vhost")
        return
    try:
        api = await _rabbit_api(namespace, servers[0]["spec"])
    except NotReady:
        return
    async with api:
        try:
            queues = await api.list_queues(vhost) if await api.get_vhost(vhost) else []
            busy = [x["name"] for x in queues if x.get("messages")]
            if busy:
                raise _blocked(
                    patch,
                    body,
                    "QueuesNotEmpty",
                    f"vhost {vhost!r} has non-empty queues {busy[:5]}; drain them or set Retain",
                )
            await api.delete_vhost(vhost)
        except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
            err = _rabbit_error(e, servers[0]["spec"]["managementUrl"])
            raise _blocked(patch, body, err.reason, err.message) from e


@kopf.index(*RB_TOPO)
def rabbit_topology_claims(namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict:
    user = (spec.get("user") or {}).get("name") or name
    server = (spec.get("serverRef") or {}).get("name")
    exchanges = [e.get("name") for e in spec.get("exchanges") or []]
    if spec.get("deadLetter"):
        exchanges.append(spec["deadLetter"].get("exchange"))
    return {
        ("user", user): _claim(meta, namespace, server),
        ("exchanges", namespace, server, spec.get("vhost")): (name, tuple(exchanges)),
    }


def _topology_conflict(
    namespace: str, name: str, spec: dict[str, Any], claims: Any, servers: Any
) -> str | None:
    user = (spec.get("user") or {}).get("name") or name
    winner = _claim_winner(
        claims.get(("user", user), []), namespace, name, _endpoint(servers, "managementUrl")
    )
    if winner:
        return f"broker user {user!r} is already claimed by RabbitTopology {winner!r}"
    return None


def _shared_exchanges(namespace: str, name: str, spec: dict[str, Any], claims: Any) -> frozenset[str]:
    others = claims.get(("exchanges", namespace, spec["serverRef"]["name"], spec["vhost"]), [])
    return frozenset(e for owner, names in others if owner != name for e in names)


async def _reconcile_topology(
    body, spec, name, namespace, patch, rabbit_servers, rabbit_topology_claims, retry=True
):
    spec = dict(spec)
    status = dict(body.get("status") or {})

    async def work(new: dict[str, Any]) -> str:
        conflict = _topology_conflict(namespace, name, spec, rabbit_topology_claims, rabbit_servers)
        if conflict:
            raise Refused("Conflict", conflict)
        secret_name = spec.get("secretName") or f"{name}-amqp"
        server = _server_for(rabbit_servers, namespace, spec["serverRef"]["name"])
        current = await _read_secret(namespace, secret_name)
        password = decode_data(current).get("password") or generate_password()
        want = rabbit.desired_topology(spec, name, password)
        for x in want.queues:
            if x["type"] == "quorum" and not x["durable"]:
                raise Refused("InvalidSpec", f"quorum queue {x['name']!r} must be durable")
        admin_user, _pw = await _admin_credentials(namespace, server["adminSecretRef"], "RabbitServer")
        async with await _rabbit_api(namespace, server) as api:
            try:
                if await api.get_vhost(want.vhost) is None:
                    raise NotReady(
                        "VhostMissing",
                        f"vhost {want.vhost!r} does not exist on RabbitServer "
                        f"{spec['serverRef']['name']!r}; create a RabbitVhost for it",
                    )
                perms = await api.get_permissions(want.vhost, admin_user)
                if not perms or perms.get("configure") != ".*":
                    await api.put_permissions(
                        want.vhost, admin_user, {"configure": ".*", "write": ".*", "read": ".*"}
                    )
                result = await rabbit.ensure_topology(
                    api,
                    want,
                    status.get("applied") or {},
                    spec.get("reclaimPolicy", "Retain") == "Delete",
                    _shared_exchanges(namespace, name, spec, rabbit_topology_claims),
                )
            except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
                if isinstance(e, rabbit.RabbitError) and e.status == 400:
                    raise Refused("InvalidSpec", f"the broker rejected the topology: {e}") from e
                raise _rabbit_error(e, server["managementUrl"]) from e
        host, port = server["amqpHost"], int(server.get("amqpPort", 5672))
        uri = amqp_uri(want.user, password, host, port, want.vhost, bool(server.get("amqpTls")))
        data = {
            "uri": uri,
            "AMQP_URL": uri,
            "host": host,
            "port": str(port),
            "vhost": want.vhost,
            "username": want.user,
            "password": password,
        }
        await _write_secret(body, secret_name, data, current)
        _count_drift("RabbitTopology", body, result.repairs, new)
        for warning in result.warnings:
            kopf.warn(body, reason="TopologyMismatch", message=warning)
        new.update(
            {
                "applied": rabbit.applied_record(want)
                | {"queues": sorted(set(rabbit.applied_record(want)["queues"]) | set(result.retained))},
                "retainedQueues": result.retained,
                "vhost": want.vhost,
                "username": want.user,
                "secretName": secret_name,
                "exchanges": len(want.exchanges),
                "queues": len(want.queues),
                "bindings": len(want.bindings),
                "_reason": "Provisioned",
            }
        )
        message = (
            f"{len(want.exchanges)} exchanges, {len(want.queues)} queues, {len(want.bindings)} bindings "
            f"in vhost {want.vhost!r}; credentials in Secret {secret_name!r}"
        )
        if result.retained:
            message += f"; retained queues no longer in spec: {result.retained}"
        if result.warnings:
            message += "; " + "; ".join(result.warnings)
        return message

    await run_reconcile("RabbitTopology", body, patch, work, retry)


@kopf.on.resume(*RB_TOPO)
@kopf.on.create(*RB_TOPO)
@kopf.on.update(*RB_TOPO)
async def topology_changed(
    body, spec, name, namespace, patch, rabbit_servers, rabbit_topology_claims, **_: Any
):
    await _reconcile_topology(body, spec, name, namespace, patch, rabbit_servers, rabbit_topology_claims)


@kopf.timer(*RB_TOPO, interval=INTERVAL, initial_delay=_jitter, idle=IDLE)
async def topology_timer(
    body, spec, name, namespace, patch, rabbit_servers, rabbit_topology_claims, **_: Any
):
    await _reconcile_topology(
        body, spec, name, namespace, patch, rabbit_servers, rabbit_topology_claims, retry=False
    )


@kopf.on.delete(*RB_TOPO)
async def topology_deleted(
    body, spec, name, namespace, meta, patch, rabbit_servers, rabbit_topology_claims, logger, **_: Any
):
    spec = dict(spec)
    if _topology_conflict(namespace, name, spec, rabbit_topology_claims, rabbit_servers):
        return
    servers = list(rabbit_servers.get((namespace, spec["serverRef"]["name"]), []))
    if not servers or servers[0]["deleting"] or (meta.get("annotations") or {}).get(FORCE_DELETE) == "true":
        logger.warning("RabbitServer gone or force-delete: releasing without touching the broker")
        return
    try:
        api = await _rabbit_api(namespace, servers[0]["spec"])
    except NotReady:
        return
    vhost = spec["vhost"]
    applied = (body.get("status") or {}).get("applied") or {}
    user = (spec.get("user") or {}).get("name") or name
    async with api:
        try:
            if await api.get_vhost(vhost) is None:
                await api.delete_user(user)
                return
            if spec.get("reclaimPolicy", "Retain") == "Delete":
                queues = {x["name"]: x for x in await api.list_queues(vhost)}
                mine = [n for n in applied.get("queues", []) if n in queues]
                busy = [n for n in mine if queues[n].get("messages")]
                if busy:
                    raise _blocked(
                        patch,
                        body,
                        "QueuesNotEmpty",
                        f"queues {busy} still hold messages; drain them, or set reclaimPolicy: Retain",
                    )
                bindings = {
                    rabbit.observed_binding_key(b): b for b in await api.list_bindings(vhost) if b["source"]
                }
                for b in applied.get("bindings", []):
                    found = bindings.get(rabbit.binding_key(b))
                    if found:
                        await api.delete_binding(vhost, b, found["properties_key"])
                for policy in applied.get("policies", []):
                    await api.delete_policy(vhost, policy)
                for queue in mine:
                    await api.delete_queue(vhost, queue)
                shared = _shared_exchanges(namespace, name, spec, rabbit_topology_claims)
                for exchange in applied.get("exchanges", []):
                    if exchange not in shared:
                        await api.delete_exchange(vhost, exchange)
            # The broker user always goes: its credentials die with the Secret (garbage-collected).
            await api.delete_user(user)
        except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
            err = _rabbit_error(e, servers[0]["spec"]["managementUrl"])
            raise _blocked(patch, body, err.reason, err.message) from e


# --- our Secrets: deleted or edited out of band -> reconcile the owner at once --------------------

_PLURALS = {"PostgresDatabase": "postgresdatabases", "RabbitTopology": "rabbittopologies"}


@kopf.on.event("", "v1", "secrets", labels={MANAGED_LABEL: "true"})
async def managed_secret_event(type: str, body: kopf.Body, namespace: str, logger, **_: Any) -> None:
    if type not in ("DELETED", "MODIFIED"):
        return
    labels = body["metadata"].get("labels") or {}
    plural = _PLURALS.get(labels.get("emporium.dev/owner-kind", ""))
    owner = labels.get("emporium.dev/owner-name")
    if not plural or not owner:
        return
    # Touching an annotation is a change Kopf hands to the update handler (one reconcile, serialised).
    try:
        await KUBE.merge_patch(
            KUBE.custom_path(namespace, plural, owner),
            {"metadata": {"annotations": {"emporium.dev/secret-changed-at": now_iso()}}},
        )
    except httpx.HTTPError as e:
        logger.warning(f"could not nudge {plural}/{owner}: {e}")
