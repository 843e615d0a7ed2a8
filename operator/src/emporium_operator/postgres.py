"""Postgres provisioning: pure planning (quoted identifiers, SCRAM verifiers) and asyncpg execution.

The plan is computed from an observed snapshot and the desired state, so the same code creates, updates
and repairs drift; every step carries the name of the object it touches (for drift metrics)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from . import trace

RESERVED_DATABASES = frozenset({"postgres", "template0", "template1"})
RESERVED_ROLES = frozenset({"postgres", "public", "current_user", "session_user", "current_role"})
MAX_IDENTIFIER = 63
# Role attributes that make a role more than a database owner: never adopted, never touched.
POWERFUL_ATTRIBUTES = {
    "rolsuper": "SUPERUSER",
    "rolcreaterole": "CREATEROLE",
    "rolreplication": "REPLICATION",
    "rolbypassrls": "BYPASSRLS",
}


def ownership_marker(owner_ref: str) -> str:
    """The comment the operator puts on the roles and databases it creates (owner_ref: Kind ns/name)."""
    return f"managed by emporium-operator for {owner_ref}"


def reserved_role(role: str, admin_user: str) -> bool:
    return role in RESERVED_ROLES or role.startswith("pg_") or role == admin_user


class InvalidName(ValueError):
    pass


def quote_ident(name: str) -> str:
    """Always-quoted SQL identifier; refuses NUL, empty and over-long names (Postgres cuts at 63 bytes)."""
    if not name or "\x00" in name:
        raise InvalidName(f"invalid identifier {name!r}")
    if len(name.encode()) > MAX_IDENTIFIER:
        raise InvalidName(f"identifier {name!r} is longer than {MAX_IDENTIFIER} bytes")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    if "\x00" in value:
        raise InvalidName("NUL in literal")
    return "'" + value.replace("'", "''") + "'"


# --- SCRAM-SHA-256 (RFC 5802 / 7677) verifiers: passwords never travel as SQL text -------------------


def _scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return stored_key, server_key


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = 4096) -> str:
    salt = salt if salt is not None else os.urandom(16)
    stored, server = _scram_keys(password, salt, iterations)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def scram_matches(verifier: str | None, password: str) -> bool:
    """True when a pg_authid.rolpassword SCRAM verifier was made from password."""
    if not verifier or not verifier.startswith("SCRAM-SHA-256$"):
        return False
    try:
        _, params, keys = verifier.split("$")
        iterations, salt = params.split(":")
        stored, server = keys.split(":")
        s2, v2 = _scram_keys(password, base64.b64decode(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(s2, base64.b64decode(stored)) and hmac.compare_digest(
        v2, base64.b64decode(server)
    )


# --- desired / observed state and the plan ---------------------------------------------------------


@dataclass(frozen=True)
class DesiredDatabase:
    database: str
    role: str
    password: str
    extensions: tuple[str, ...] = ()
    marker: str = ""  # ownership_marker(...): the comment on the role and the database
    drop_extensions: tuple[str, ...] = ()  # applied earlier, no longer in the spec
    # The password comes from this object's own Secret: a role without a comment whose verifier matches
    # it was made by an earlier version of the operator for this object (adopting it needs the password).
    password_from_secret: bool = False


@dataclass
class ObservedDatabase:
    role_exists: bool = False
    role_can_login: bool = False
    role_password: str | None = None  # SCRAM verifier, None if unreadable (non-superuser admin)
    password_readable: bool = True
    database_exists: bool = False
    database_owner: str | None = None
    database_acl: list[str] | None = None  # None means the default ACL (PUBLIC may CONNECT and TEMP)
    schema_owner: str | None = None
    schema_acl: list[str] | None = None
    extensions: set[str] = field(default_factory=set)
    role_comment: str | None = None
    role_powers: list[str] = field(default_factory=list)  # SUPERUSER, CREATEROLE, ... the role has
    database_comment: str | None = None


@dataclass(frozen=True)
class Step:
    obj: str  # role, password, database, owner, privileges, schema, extension
    sql: str
    dbname: str | None = None  # None: the admin database; else run inside this database


def _public_entry(acl: list[str] | None) -> bool:
    """ACL items look like 'grantee=privs/grantor'; PUBLIC has an empty grantee. None = default (PUBLIC)."""
    if acl is None:
        return True
    return any(item.startswith("=") for item in acl)


def takeover(observed: ObservedDatabase, desired: DesiredDatabase) -> str | None:
    """Why applying desired would touch a role or database the operator does not own (None: it would not).

    Ours means: created by the operator for this very object (the comment says so); a database without
    a comment is ours when its owner is our role (the comment follows CREATE DATABASE, which cannot run in
    the role's transaction)."""
    if observed.role_exists:
        if observed.role_powers:
            return f"role {desired.role!r} exists with {', '.join(observed.role_powers)}; it is never managed"
        legacy = (
            observed.role_comment is None
            and desired.password_from_secret
            and scram_matches(observed.role_password, desired.password)
        )
        if observed.role_comment != desired.marker and not legacy:
            return f"role {desired.role!r} exists and was not created by the operator for this object"
    if observed.database_exists and observed.database_comment != desired.marker:
        ours = observed.role_exists and observed.database_owner == desired.role
        if observed.database_comment or not ours:
            return f"database {desired.database!r} exists and was not created by the operator for this object"
    return None


def plan(observed: ObservedDatabase, desired: DesiredDatabase) -> list[Step]:
    role, db = quote_ident(desired.role), quote_ident(desired.database)
    steps: list[Step] = []
    # A verifier costs a PBKDF2 of 4096 rounds: made only when a role is created or its password reset.
    verifier = lambda: quote_literal(scram_verifier(desired.password))  # noqa: E731
    marker = quote_literal(desired.marker)
    # A role's password costs the server a PBKDF2 too (it checks the verifier is not of an empty password).
    # With a database to create, the role is made NOLOGIN and gets LOGIN and its password after CREATE
    # DATABASE, in the admin batch that runs while the connection into the new database is being opened.
    login_later = not observed.role_exists and not observed.database_exists
    if not observed.role_exists:
        # One statement: the role never exists without its ownership comment.
        login = "NOLOGIN" if login_later else f"LOGIN PASSWORD {verifier()}"
        steps.append(
            Step(
                "role",
                f"CREATE ROLE {role} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS {login}; "
                f"COMMENT ON ROLE {role} IS {marker}",
            )
        )
    else:
        if observed.role_comment != desired.marker:  # adopted from an earlier version: mark it
            steps.append(Step("ownership", f"COMMENT ON ROLE {role} IS {marker}"))
        if not observed.role_can_login:
            steps.append(Step("role", f"ALTER ROLE {role} LOGIN"))
        if not observed.password_readable or not scram_matches(observed.role_password, desired.password):
            steps.append(Step("password", f"ALTER ROLE {role} PASSWORD {verifier()}"))
    if not observed.database_exists:
        steps.append(Step("database", f"CREATE DATABASE {db} OWNER {role}"))
    if not observed.database_exists or observed.database_comment != desired.marker:
        steps.append(Step("ownership", f"COMMENT ON DATABASE {db} IS {marker}"))
    elif observed.database_owner != desired.role:
        steps.append(Step("owner", f"ALTER DATABASE {db} OWNER TO {role}"))
    if not observed.database_exists or _public_entry(observed.database_acl):
        steps.append(Step("privileges", f"REVOKE ALL ON DATABASE {db} FROM PUBLIC"))
    if login_later:
        steps.append(Step("role", f"ALTER ROLE {role} LOGIN PASSWORD {verifier()}"))
    if not observed.database_exists or observed.schema_owner != desired.role:
        steps.append(Step("schema", f"ALTER SCHEMA public OWNER TO {role}", desired.database))
    if not observed.database_exists or _public_entry(observed.schema_acl):
        steps.append(Step("schema", "REVOKE ALL ON SCHEMA public FROM PUBLIC", desired.database))
    installed = set() if not observed.database_exists else observed.extensions
    for ext in desired.extensions:
        if ext not in installed:
            steps.append(
                Step("extension", f"CREATE EXTENSION IF NOT EXISTS {quote_ident(ext)}", desired.database)
            )
    for ext in desired.drop_extensions:
        if ext in installed and ext not in desired.extensions:
            # No CASCADE: an extension that objects depend on stays, and the error says which.
            steps.append(
                Step("extension-removed", f"DROP EXTENSION IF EXISTS {quote_ident(ext)}", desired.database)
            )
    return steps


# --- execution -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConn:
    host: str
    port: int
    user: str
    password: str
    admin_database: str = "postgres"
    sslmode: str = "prefer"


async def connect(
    server: ServerConn, dbname: str | None = None, connect_timeout: float = 5
) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        database=dbname or server.admin_database,
        ssl=server.sslmode,
        timeout=connect_timeout,
        command_timeout=30,
        server_settings={"application_name": "emporium-operator"},
    )


class ServerPool:
    """One per server and credentials: an asyncpg pool on the admin database (reused by every reconcile)
    and a semaphore bounding how many reconciles talk to the server at once."""

    def __init__(self, server: ServerConn, concurrency: int):
        self.server = server
        self.limit = asyncio.Semaphore(concurrency)
        self.size = concurrency
        self._pool: asyncpg.Pool | None = None
        self._creating = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._creating:
                if self._pool is None:
                    s = self.server
                    self._pool = await asyncpg.create_pool(
                        host=s.host,
                        port=s.port,
                        user=s.user,
                        password=s.password,
                        database=s.admin_database,
                        ssl=s.sslmode,
                        timeout=5,
                        command_timeout=30,
                        min_size=0,
                        max_size=self.size,
                        max_inactive_connection_lifetime=60,
                        server_settings={"application_name": "emporium-operator"},
                    )
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


CONCURRENCY = int(os.environ.get("EMPORIUM_POSTGRES_CONCURRENCY", "4"))
_POOLS: dict[ServerConn, ServerPool] = {}


async def pool_for(server: ServerConn) -> ServerPool:
    pool = _POOLS.get(server)
    if pool is None:
        for old in [k for k in _POOLS if (k.host, k.port) == (server.host, server.port)]:
            await _POOLS.pop(old).close()  # credentials or options changed
        pool = _POOLS[server] = ServerPool(server, CONCURRENCY)
    return pool


def forget_pools() -> None:
    _POOLS.clear()


async def close_pools() -> None:
    while _POOLS:
        await _POOLS.popitem()[1].close()


async def server_version(server: ServerConn) -> str:
    pool = await pool_for(server)
    async with pool.limit, (await pool.pool()).acquire() as conn:
        return await conn.fetchval("SHOW server_version")


class _Connections:
    """The admin connection (from the pool) and, when needed, one to the target database."""

    def __init__(self, admin: asyncpg.Connection, server: ServerConn):
        self.admin, self.server = admin, server
        self.by_db: dict[str, asyncpg.Connection] = {}
        self.connecting: dict[str, asyncio.Future] = {}

    def connect_soon(self, dbname: str) -> None:
        """Start connecting to dbname now (a new backend costs a fork and an authentication); get() awaits
        it."""
        if dbname not in self.by_db and dbname not in self.connecting:
            self.connecting[dbname] = asyncio.ensure_future(connect(self.server, dbname))

    async def get(self, dbname: str | None = None) -> asyncpg.Connection:
        if dbname is None:
            return self.admin
        conn = self.by_db.get(dbname)
        if conn is None:
            self.connect_soon(dbname)
            with trace.span("pg.connect-wait"):
                conn = self.by_db[dbname] = await self.connecting.pop(dbname)
        return conn

    async def close(self, wait: bool = True) -> None:
        """Close the per-database connections; wait=False lets them close in the background (a reconcile's
        result does not depend on the server acknowledging the goodbye)."""
        for pending in self.connecting.values():
            pending.add_done_callback(_close_unused)
        self.connecting.clear()
        conns = list(self.by_db.values())
        self.by_db.clear()
        for conn in conns:
            if wait:
                await conn.close()
            else:
                _background(conn.close())


def _background(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


def _close_unused(future: asyncio.Future) -> None:
    """A connection started by connect_soon and never used: closed when it arrives, errors dropped."""
    if not future.cancelled() and future.exception() is None:
        _background(future.result().close())


_CLOSING: set[asyncio.Future] = set()


@contextlib.asynccontextmanager
async def session(server: ServerConn, wait_close: bool = True) -> AsyncIterator[_Connections]:
    """A pooled admin connection (under the server's concurrency bound) and, on demand, connections into
    databases (closed at the end; wait_close=False: in the background)."""
    pool = await pool_for(server)
    async with contextlib.AsyncExitStack() as stack:
        with trace.span("pg.acquire"):
            await stack.enter_async_context(pool.limit)
            admin = await stack.enter_async_context((await pool.pool()).acquire())
        conns = _Connections(admin, server)
        try:
            yield conns
        finally:
            await conns.close(wait_close)


# The role and the database in one round trip (LEFT JOINs on a one-row relation: absent ones are NULLs).
_OBSERVE = """
SELECT r.rolname IS NOT NULL, r.rolcanlogin, {verifier}, r.rolsuper, r.rolcreaterole, r.rolreplication,
       r.rolbypassrls, shobj_description(r.oid, 'pg_authid'),
       d.datname IS NOT NULL, pg_get_userbyid(d.datdba), d.datacl::text[],
       shobj_description(d.oid, 'pg_database')
FROM (SELECT 1) AS one
LEFT JOIN {roles} AS r ON r.rolname = $1
LEFT JOIN pg_database AS d ON d.datname = $2
"""
_OBSERVE_AUTHID = _OBSERVE.format(verifier="r.rolpassword", roles="pg_authid")
_OBSERVE_ROLES = _OBSERVE.format(verifier="NULL::text", roles="pg_roles")  # no read access to pg_authid


async def observe(conns: _Connections, role: str, database: str) -> ObservedDatabase:
    """What the server has of the role and the database (one query on the admin connection) and, when the
    database exists, of its public schema and extensions (one more connection)."""
    observed = ObservedDatabase()
    conn = await conns.get()
    try:
        row = await conn.fetchrow(_OBSERVE_AUTHID, role, database)
    except asyncpg.InsufficientPrivilegeError:
        observed.password_readable = False
        row = await conn.fetchrow(_OBSERVE_ROLES, role, database)
    if row[0]:
        observed.role_exists, observed.role_can_login, observed.role_password = True, row[1], row[2]
        observed.role_powers = [
            label for label, value in zip(POWERFUL_ATTRIBUTES.values(), row[3:7], strict=True) if value
        ]
        observed.role_comment = row[7]
    if row[8]:
        observed.database_exists, observed.database_owner, observed.database_acl = True, row[9], row[10]
        observed.database_comment = row[11]
    if observed.database_exists:
        conn = await conns.get(database)
        row = await conn.fetchrow(
            "SELECT pg_get_userbyid(nspowner), nspacl::text[] FROM pg_namespace WHERE nspname = 'public'"
        )
        if row:
            observed.schema_owner, observed.schema_acl = row[0], row[1]
        observed.extensions = {r[0] for r in await conn.fetch("SELECT extname FROM pg_extension")}
    return observed


class Forbidden(Exception):
    """Applying the spec would take over a role or database the operator does not own."""


def checked_plan(observed: ObservedDatabase, desired: DesiredDatabase) -> list[Step]:
    """The steps from observed to desired; Forbidden (nothing to run) when a role or database is not the
    operator's."""
    problem = takeover(observed, desired)
    if problem:
        raise Forbidden(problem)
    with trace.span("pg.plan"):
        return plan(observed, desired)


async def ensure(server: ServerConn, desired: DesiredDatabase) -> list[Step]:
    """Observe, plan and apply over the pooled admin connection and, when needed, one to the target
    database; returns the steps that were needed (empty when nothing drifted). Raises Forbidden, having
    changed nothing, when a role or database is not the operator's."""
    async with session(server, wait_close=False) as conns:
        with trace.span("pg.observe"):
            observed = await observe(conns, desired.role, desired.database)
        steps = checked_plan(observed, desired)
        await apply(conns, steps)
        return steps


async def apply(conns: _Connections, steps: list[Step]) -> None:
    """Run the steps in order, consecutive ones for the same database as one simple query (one round trip);
    CREATE DATABASE alone (it cannot run inside the implicit transaction of a multi-statement query). Once
    the database exists, the connection into it is opened while the admin connection works on."""
    batch: list[Step] = []

    async def flush() -> None:
        if batch:
            conn = await conns.get(batch[0].dbname)
            with trace.span("pg." + "+".join(dict.fromkeys(s.obj for s in batch))):
                await conn.execute("; ".join(s.sql for s in batch))
            batch.clear()

    for step in steps:
        alone = step.sql.startswith("CREATE DATABASE ")
        if alone or (batch and batch[0].dbname != step.dbname):
            await flush()
        batch.append(step)
        if alone:
            await flush()
            in_database = next((s.dbname for s in steps if s.dbname), None)
            if in_database:
                conns.connect_soon(in_database)
    await flush()


async def active_connections(server: ServerConn, database: str) -> int:
    async with session(server) as conns:
        return await conns.admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database
        )


async def drop(server: ServerConn, desired: DesiredDatabase) -> None:
    """Drop the database, then the role (REASSIGN/DROP OWNED elsewhere is left to a person); only what the
    operator created for this object (else Forbidden, nothing dropped)."""
    async with session(server) as conns:
        problem = takeover(await observe(conns, desired.role, desired.database), desired)
        if problem:
            raise Forbidden(problem)
        await conns.close()  # no connection of ours may stay in the database being dropped
        await conns.admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(desired.database)}")
        await conns.admin.execute(f"DROP ROLE IF EXISTS {quote_ident(desired.role)}")
