"""Postgres provisioning: pure planning (quoted identifiers, SCRAM verifiers) and asyncpg execution.

The plan is computed from an observed snapshot and the desired state, so the same code creates, updates
and repairs drift; every step carries the name of the object it touches (for drift metrics)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field

import asyncpg

RESERVED_DATABASES = frozenset({"postgres", "template0", "template1"})
MAX_IDENTIFIER = 63


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


def plan(observed: ObservedDatabase, desired: DesiredDatabase) -> list[Step]:
    role, db = quote_ident(desired.role), quote_ident(desired.database)
    steps: list[Step] = []
    verifier = quote_literal(scram_verifier(desired.password))
    if not observed.role_exists:
        steps.append(
            Step("role", f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {verifier}")
        )
    else:
        if not observed.role_can_login:
            steps.append(Step("role", f"ALTER ROLE {role} LOGIN"))
        if not observed.password_readable or not scram_matches(observed.role_password, desired.password):
            steps.append(Step("password", f"ALTER ROLE {role} PASSWORD {verifier}"))
    if not observed.database_exists:
        steps.append(Step("database", f"CREATE DATABASE {db} OWNER {role}"))
    elif observed.database_owner != desired.role:
        steps.append(Step("owner", f"ALTER DATABASE {db} OWNER TO {role}"))
    if not observed.database_exists or _public_entry(observed.database_acl):
        steps.append(Step("privileges", f"REVOKE ALL ON DATABASE {db} FROM PUBLIC"))
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


async def server_version(server: ServerConn) -> str:
    conn = await connect(server)
    try:
        return await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()


class _Connections:
    """Connections by database name, opened on first use and reused for observing and applying."""

    def __init__(self, server: ServerConn):
        self.server = server
        self.by_db: dict[str | None, asyncpg.Connection] = {}

    async def get(self, dbname: str | None = None) -> asyncpg.Connection:
        conn = self.by_db.get(dbname)
        if conn is None:
            conn = self.by_db[dbname] = await connect(self.server, dbname)
        return conn

    async def close(self) -> None:
        for conn in self.by_db.values():
            await conn.close()
        self.by_db.clear()


async def _observe(conns: _Connections, desired: DesiredDatabase) -> ObservedDatabase:
    observed = ObservedDatabase()
    conn = await conns.get()
    try:
        row = await conn.fetchrow(
            "SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = $1", desired.role
        )
    except asyncpg.InsufficientPrivilegeError:
        observed.password_readable = False
        row = await conn.fetchrow(
            "SELECT rolcanlogin, NULL AS rolpassword FROM pg_roles WHERE rolname = $1", desired.role
        )
    if row:
        observed.role_exists, observed.role_can_login, observed.role_password = True, row[0], row[1]
    row = await conn.fetchrow(
        "SELECT pg_get_userbyid(datdba), datacl::text[] FROM pg_database WHERE datname = $1",
        desired.database,
    )
    if row:
        observed.database_exists, observed.database_owner, observed.database_acl = True, row[0], row[1]
    if observed.database_exists:
        conn = await conns.get(desired.database)
        row = await conn.fetchrow(
            "SELECT pg_get_userbyid(nspowner), nspacl::text[] FROM pg_namespace WHERE nspname = 'public'"
        )
        if row:
            observed.schema_owner, observed.schema_acl = row[0], row[1]
        observed.extensions = {r[0] for r in await conn.fetch("SELECT extname FROM pg_extension")}
    return observed


async def observe(server: ServerConn, desired: DesiredDatabase) -> ObservedDatabase:
    conns = _Connections(server)
    try:
        return await _observe(conns, desired)
    finally:
        await conns.close()


async def ensure(server: ServerConn, desired: DesiredDatabase) -> list[Step]:
    """Observe, plan and apply over at most two connections (admin database and the target database);
    returns the steps that were needed (empty when nothing drifted)."""
    conns = _Connections(server)
    try:
        steps = plan(await _observe(conns, desired), desired)
        for step in steps:
            await (await conns.get(step.dbname)).execute(step.sql)
        return steps
    finally:
        await conns.close()


async def active_connections(server: ServerConn, database: str) -> int:
    conn = await connect(server)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database
        )
    finally:
        await conn.close()


async def drop(server: ServerConn, database: str, role: str) -> None:
    """Drop the database, then the role (REASSIGN/DROP OWNED elsewhere is left to a person)."""
    conn = await connect(server)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)}")
        await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
    finally:
        await conn.close()
