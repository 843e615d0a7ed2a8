"""PostgresDatabase: a database, the login role owning it, extensions, and the connection Secret."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import kopf

from . import events, pg_server, postgres, trace
from .common import (
    CredentialsSecret,
    NotReady,
    Outcome,
    Refused,
    blocked,
    claim,
    claim_winner,
    count_drift,
    force_delete,
    rotation_due,
    secret_password,
    server_key,
)
from .conditions import now_iso
from .engine import ENGINE, locked_delete, reclaims
from .secrets import generate_password, jdbc_uri, parse_duration, pgpass, postgres_uri

KIND, PLURAL = "PostgresDatabase", "postgresdatabases"


def names(name: str, spec: dict[str, Any]) -> tuple[str, str, str]:
    dbname = spec.get("databaseName") or name
    return dbname, spec.get("owner") or f"{dbname}_owner", spec.get("secretName") or f"{name}-db"


def marker(namespace: str, name: str) -> str:
    return postgres.ownership_marker(f"{KIND} {namespace}/{name}")


def conflict(body: dict[str, Any]) -> str | None:
    """A second PostgresDatabase (any namespace) for the same database or role on the same server."""
    meta, spec = body["metadata"], body["spec"]
    dbname, owner, _ = names(meta["name"], spec)
    claims_db, claims_role = [], []
    for other in ENGINE.objects(PLURAL):
        odb, oowner, _ = names(other["metadata"]["name"], other["spec"])
        c = claim(other, server_key(other))
        if odb == dbname:
            claims_db.append(c)
        if oowner == owner:
            claims_role.append(c)

    def endpoint_of(key: tuple[str, str] | None) -> str | None:
        return pg_server.endpoint(ENGINE.get(pg_server.PLURAL, *key)) if key else None

    for claims, what in ((claims_db, f"database {dbname!r}"), (claims_role, f"role {owner!r}")):
        winner = claim_winner(claims, meta["namespace"], meta["name"], endpoint_of)
        if winner:
            return f"{what} on the same server is already claimed by {KIND} {winner!r}"
    return None


def binding_data(owner: str, password: str, conn: postgres.ServerConn, dbname: str) -> dict[str, str]:
    uri = postgres_uri(owner, password, conn.host, conn.port, dbname, conn.sslmode)
    return {
        # Emporium's keys
        "uri": uri,
        "DATABASE_URL": uri,
        "host": conn.host,
        "port": str(conn.port),
        "dbname": dbname,
        "username": owner,
        "password": password,
        # servicebinding.io (type, provider, database) and CloudNativePG's app Secret (jdbc-uri, pgpass)
        "type": "postgresql",
        "provider": "emporium-operator",
        "database": dbname,
        "jdbc-uri": jdbc_uri(owner, password, conn.host, conn.port, dbname, conn.sslmode),
        "pgpass": pgpass(owner, password, conn.host, conn.port, dbname),
    }


async def reconcile(body: dict[str, Any], out: Outcome) -> str:
    meta, spec = body["metadata"], dict(body["spec"])
    namespace, name = meta["namespace"], meta["name"]
    status = dict(body.get("status") or {})
    dbname, owner, secret_name = names(name, spec)
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
    problem = conflict(body)
    if problem:
        raise Refused("Conflict", problem)
    server = await pg_server.server_for(body)
    server_ref = (pg_server.PLURAL, server["metadata"]["namespace"], server["metadata"]["name"])
    # The object's own Secret is read while the admin credentials are looked up and the server is observed;
    # a new one is written while the steps run, an existing one after them (CredentialsSecret).
    async with CredentialsSecret(body, secret_name) as secret:
        with trace.span("admin-secret"):
            conn = await pg_server.connection(server)
        if postgres.reserved_role(owner, conn.user):
            raise Refused("Forbidden", f"role {owner!r} is reserved (postgres, pg_*, the admin user)")
        try:
            async with postgres.session(conn, wait_close=False) as conns:
                with trace.span("pg.observe"):
                    observed = await postgres.observe(conns, owner, dbname)
                with trace.span("secret.read"):
                    current = await secret.read()
                existing = secret_password(current)
                now = dt.datetime.now(dt.UTC)
                rotate, trigger = rotation_due(spec, status, now)
                rotated = bool(existing and rotate)
                password = generate_password() if rotated or not existing else existing
                wanted = tuple(spec.get("extensions") or ())
                removed = tuple(e for e in status.get("extensions") or [] if e not in wanted)
                desired = postgres.DesiredDatabase(
                    dbname,
                    owner,
                    password,
                    wanted,
                    marker(namespace, name),
                    removed,
                    password_from_secret=bool(existing) and not rotated,
                )
                steps = postgres.checked_plan(observed, desired)
                secret.prepare(binding_data(owner, password, conn, dbname))
                await postgres.apply(conns, steps)
        except postgres.Forbidden as e:
            raise Refused("Forbidden", f"{e}; nothing was changed") from e
        except asyncpg.DependentObjectsStillExistError as e:
            raise Refused("InvalidSpec", f"a removed extension is still in use: {e}") from e
        except (TimeoutError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
            if isinstance(e, asyncpg.UndefinedFileError | asyncpg.FeatureNotSupportedError):
                raise Refused("InvalidSpec", f"extension cannot be installed: {e}") from e
            raise pg_server.error(e, f"{conn.host}:{conn.port}", server_ref) from e
    await secret.save()
    objects = [s.obj for s in steps if not (rotated and s.obj == "password")]
    count_drift(KIND, body, objects, out)
    out.status.update(
        {
            "databaseName": dbname,
            "username": owner,
            "secretName": secret_name,
            "server": server["metadata"]["name"],
            "extensions": sorted(wanted),
        }
    )
    if trigger:
        out.status["rotationTrigger"] = trigger
    if rotated or not status.get("passwordRotatedAt") or not existing:
        out.status["passwordRotatedAt"] = now_iso()
    out.reason = "Provisioned"
    return f"database {dbname!r} owned by {owner!r}; credentials in Secret {secret_name!r}"


async def _delete(body: dict[str, Any], patch: kopf.Patch, logger: Any) -> None:
    meta, spec = body["metadata"], body["spec"]
    namespace, name = meta["namespace"], meta["name"]
    if not needs_cleanup(spec):
        return
    if conflict(body):
        return  # never drop what another object owns
    if force_delete(body):
        logger.warning("force-delete annotation: releasing without dropping the database")
        return
    try:
        server = await pg_server.server_for(body)
        conn = await pg_server.connection(server)
    except NotReady as e:
        logger.warning(f"{e.message}: releasing without dropping the database")
        return
    dbname, owner, _ = names(name, spec)
    if postgres.reserved_role(owner, conn.user):
        return
    try:
        active = await postgres.active_connections(conn, dbname)
        if active:
            raise blocked(
                body,
                patch,
                "ActiveConnections",
                f"database {dbname!r} has {active} active connection(s); close them to delete it "
                f"(or set reclaimPolicy: Retain)",
            )
        await postgres.drop(conn, postgres.DesiredDatabase(dbname, owner, "", (), marker(namespace, name)))
    except postgres.Forbidden as e:
        events.warn(body, reason="Forbidden", message=f"{e}: released without dropping anything")
    except asyncpg.ObjectInUseError as e:
        raise blocked(body, patch, "ActiveConnections", f"database {dbname!r} is in use: {e}") from e
    except asyncpg.DependentObjectsStillExistError as e:
        raise blocked(body, patch, "DependentObjects", f"role {owner!r} owns objects elsewhere: {e}") from e
    except (TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.PostgresError) as e:
        err = pg_server.error(e, f"{conn.host}:{conn.port}")
        raise blocked(
            body, patch, err.reason, err.message + " (annotate emporium.dev/force-delete=true)"
        ) from e


needs_cleanup = reclaims
delete = locked_delete(PLURAL, _delete)
