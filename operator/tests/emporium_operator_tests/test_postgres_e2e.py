"""PostgresServer and PostgresDatabase through the real operator (KopfRunner), API server and Postgres.
Each test makes the objects it needs (names unique per test)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

PG_DB = "PostgresDatabase"


@pytest.fixture
def make_db(kube, env):
    """Create a PostgresDatabase with a unique name (and database) and wait until it is Ready."""

    async def make(prefix: str = "db", **spec) -> tuple[str, dict]:
        name = kube.unique(prefix)
        spec.setdefault("databaseName", name.replace("-", "_"))
        kube.create(env["ns"], PG_DB, name, {"serverRef": {"name": "pg"}, **spec})
        return name, await kube.wait_ready(env["ns"], PG_DB, name)

    return make


async def connects(uri: str) -> bool:
    try:
        conn = await asyncpg.connect(uri)
    except asyncpg.InvalidPasswordError:
        return False
    await conn.close()
    return True


async def test_server_ready_liveness_and_metrics(kube, env):
    ns = env["ns"]
    obj = await kube.wait_ready(ns, "PostgresServer", "pg")
    assert obj["status"]["version"].split(".")[0].isdigit()
    assert kube.condition(obj)["reason"] == "Connected"
    async with httpx.AsyncClient() as http:
        live = await http.get(f"http://127.0.0.1:{env['liveness_port']}/healthz")
        assert live.status_code == 200
        text = (await http.get(f"http://127.0.0.1:{env['metrics_port']}/metrics")).text
    assert 'emporium_operator_reconcile_total{kind="PostgresServer",result="ok"}' in text
    assert "emporium_operator_reconcile_duration_seconds_bucket" in text
    out = kube.kubectl("get", "postgresservers", "-n", ns).stdout
    assert "VERSION" in out and "READY" in out and "REASON" in out


async def test_database_secret_connects_with_exactly_its_rights(kube, env, postgres, make_db):
    ns = env["ns"]
    name, obj = await make_db("orders", extensions=["citext"])
    _other, other_obj = await make_db("users")
    dbname = obj["status"]["databaseName"]
    secret = kube.secret(ns, f"{name}-db")
    assert {"uri", "DATABASE_URL", "host", "port", "dbname", "username", "password"} <= set(secret)
    # servicebinding.io and CloudNativePG's keys
    assert secret["type"] == "postgresql" and secret["provider"] == "emporium-operator"
    assert secret["database"] == secret["dbname"] == dbname and secret["username"] == f"{dbname}_owner"
    assert secret["jdbc-uri"].startswith(
        f"jdbc:postgresql://{secret['host']}:{secret['port']}/{dbname}?user="
    )
    assert secret["pgpass"] == (
        f"{secret['host']}:{secret['port']}:{dbname}:{secret['username']}:{secret['password']}\n"
    )
    assert secret["uri"] == secret["DATABASE_URL"]
    meta = kube.core.read_namespaced_secret(f"{name}-db", ns).metadata
    assert len(meta.annotations["emporium.dev/credentials-hash"]) == 32
    conn = await asyncpg.connect(secret["uri"])
    try:
        await conn.execute("CREATE TABLE t (id serial primary key, name citext)")
        await conn.execute("INSERT INTO t (name) VALUES ('A')")
        assert await conn.fetchval("SELECT count(*) FROM t WHERE name = 'a'") == 1
        owner = await conn.fetchval("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname='public'")
        assert owner == secret["username"]
        assert not await conn.fetchval(
            "SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        )
    finally:
        await conn.close()
    # The role cannot even connect to the other database (CONNECT revoked from PUBLIC).
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(
            postgres.dsn(other_obj["status"]["databaseName"], secret["username"], secret["password"])
        )
    assert meta.labels["emporium.dev/managed"] == "true"
    assert kube.core.read_namespaced_secret(f"{name}-db", ns).metadata.owner_references[0].kind == PG_DB
    out = kube.kubectl("get", "postgresdatabases", "-n", ns).stdout
    assert f"{name}-db" in out and "Provisioned" in out
    # Retain objects carry no finalizer: deleting them (or their namespace) never waits for the operator.
    assert not kube.get(ns, PG_DB, name)["metadata"].get("finalizers")


async def test_extensions_added_and_removed(kube, env, postgres, make_db):
    ns = env["ns"]
    name, obj = await make_db("ext", extensions=["citext"])
    dbname = obj["status"]["databaseName"]
    kube.patch_spec(ns, PG_DB, name, {"extensions": ["citext", "pgcrypto"]})
    await kube.wait_ready(ns, PG_DB, name)
    assert "pgcrypto" in postgres.psql("SELECT extname FROM pg_extension", dbname)
    kube.patch_spec(ns, PG_DB, name, {"extensions": ["pgcrypto"]})
    await kube.wait_ready(ns, PG_DB, name)
    await kube.wait_for(
        lambda: "citext" not in postgres.psql("SELECT extname FROM pg_extension", dbname),
        within=10,
        what="citext dropped",
    )
    assert "pgcrypto" in postgres.psql("SELECT extname FROM pg_extension", dbname)


async def test_drift_repair_dropped_database_role_and_password(kube, env, postgres, make_db):
    ns = env["ns"]
    name, obj = await make_db("drift")
    dbname, role = obj["status"]["databaseName"], obj["status"]["username"]
    postgres.psql(f'DROP DATABASE "{dbname}" WITH (FORCE)')
    postgres.psql(f'DROP ROLE "{role}"')
    await kube.wait_for(
        lambda: postgres.psql(f"SELECT 1 FROM pg_database WHERE datname='{dbname}'") == "1",  # noqa: S608
        within=30,
        what="database recreated",
    )
    obj = await kube.wait_for(
        lambda: (o := kube.get(ns, PG_DB, name))["status"].get("driftRepairs", 0) >= 2 and o, within=30
    )
    assert obj["status"]["lastDriftRepair"]["objects"]
    await kube.wait_for(lambda: kube.events(ns, name, "DriftRepaired", "Normal"), within=10, what="event")
    # A password changed behind the operator's back is reset to the Secret's.
    postgres.psql(f"ALTER ROLE \"{role}\" PASSWORD 'tampered'")
    secret = kube.secret(ns, f"{name}-db")
    for _ in range(60):
        if await connects(secret["uri"]):
            break
        await asyncio.sleep(0.5)
    assert await connects(secret["uri"]), "the role's password was not reset to the Secret's"
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{env['metrics_port']}/metrics")).text
    for obj_label in ("database", "role", "password"):
        assert (
            f'emporium_operator_drift_repairs_total{{kind="PostgresDatabase",object="{obj_label}"}}' in text
        )


async def test_password_rotation_by_trigger(kube, env, make_db):
    ns = env["ns"]
    name, _ = await make_db("rotate")
    old = kube.secret(ns, f"{name}-db")
    old_hash = kube.core.read_namespaced_secret(f"{name}-db", ns).metadata.annotations
    kube.patch_spec(ns, PG_DB, name, {"passwordRotation": {"trigger": "2026-11-25"}})
    new = await kube.wait_for(
        lambda: (s := kube.secret(ns, f"{name}-db"))["password"] != old["password"] and s,
        within=30,
        what="rotated password",
    )
    assert await connects(new["uri"])
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(old["uri"])
    obj = await kube.wait_ready(ns, PG_DB, name)
    assert obj["status"]["rotationTrigger"] == "2026-11-25"
    new_hash = kube.core.read_namespaced_secret(f"{name}-db", ns).metadata.annotations
    assert new_hash["emporium.dev/credentials-hash"] != old_hash["emporium.dev/credentials-hash"]


async def test_retain_versus_delete_and_active_connections_block(kube, env, postgres, make_db):
    ns = env["ns"]
    kept, obj = await make_db("kept")  # reclaimPolicy defaults to Retain
    kube.delete(ns, PG_DB, kept)
    await kube.wait_gone(ns, PG_DB, kept)
    kept_db = obj["status"]["databaseName"]
    assert postgres.psql(f"SELECT 1 FROM pg_database WHERE datname='{kept_db}'") == "1"  # noqa: S608
    await kube.wait_for(lambda: kube.secret(ns, f"{kept}-db") is None, within=30, what="Secret collected")

    scratch, obj = await make_db("scratch", reclaimPolicy="Delete")
    dbname, role = obj["status"]["databaseName"], obj["status"]["username"]
    assert kube.get(ns, PG_DB, scratch)["metadata"]["finalizers"] == ["emporium.dev/cleanup"]
    conn = await asyncpg.connect(kube.secret(ns, f"{scratch}-db")["uri"])
    kube.delete(ns, PG_DB, scratch)
    obj = await kube.wait_reason(ns, PG_DB, scratch, "ActiveConnections", type_="DeletionBlocked")
    assert "active connection" in kube.condition(obj, "DeletionBlocked")["message"]
    await conn.close()
    await kube.wait_gone(ns, PG_DB, scratch, within=30)
    assert postgres.psql(f"SELECT count(*) FROM pg_database WHERE datname='{dbname}'") == "0"  # noqa: S608
    assert postgres.psql(f"SELECT count(*) FROM pg_roles WHERE rolname='{role}'") == "0"  # noqa: S608


async def test_deleted_or_edited_secret_is_repaired_within_5s(kube, env, make_db):
    ns = env["ns"]
    name, _ = await make_db("secret")
    secret_name = f"{name}-db"
    kube.core.delete_namespaced_secret(secret_name, ns)
    secret = await kube.wait_for(lambda: kube.secret(ns, secret_name), within=5, what="Secret recreated")
    assert await connects(secret["uri"])
    # An edited key is put back; an edited password is applied to the server (the Secret is the truth).
    kube.core.patch_namespaced_secret(
        secret_name, ns, {"stringData": {"host": "elsewhere.example", "password": "edited-pw"}}
    )
    fixed = await kube.wait_for(
        lambda: (s := kube.secret(ns, secret_name))["host"] != "elsewhere.example" and s,
        within=5,
        what="Secret repaired",
    )
    assert fixed["password"] == "edited-pw"
    assert await connects(fixed["uri"])


async def test_observe_reads_role_and_database_in_one_query_also_without_pg_authid(postgres):
    """The observe query (role and database at once) on a superuser admin, and on an admin that may not read
    pg_authid (CREATEDB, CREATEROLE: the pg_roles fallback, password unreadable)."""
    from emporium_operator import postgres as pg

    tag = uuid.uuid4().hex[:6]
    postgres.psql(f"CREATE ROLE admin_{tag} LOGIN CREATEDB CREATEROLE PASSWORD 'admin-pw'")
    postgres.psql(f"CREATE ROLE app_{tag} LOGIN PASSWORD 'app-pw'")
    postgres.create_database(f"app_{tag}", owner=f"app_{tag}")
    postgres.psql(f"COMMENT ON DATABASE app_{tag} IS 'a comment'")
    superuser = pg.ServerConn(
        postgres.host, postgres.port, postgres.superuser, postgres.password, sslmode="disable"
    )
    limited = pg.ServerConn(postgres.host, postgres.port, f"admin_{tag}", "admin-pw", sslmode="disable")
    for server, readable in ((superuser, True), (limited, False)):
        # A plain connection, not the operator's pools (the in-process operator of this module uses them).
        conns = pg._Connections(await pg.connect(server), server)
        try:
            absent = await pg.observe(conns, f"nobody_{tag}", f"nothing_{tag}")
            present = await pg.observe(conns, f"app_{tag}", f"app_{tag}")
        finally:
            await conns.close()
            await conns.admin.close()
        assert not absent.role_exists and not absent.database_exists
        assert absent.password_readable is readable
        assert present.role_exists and present.role_can_login and present.role_powers == []
        if readable:
            assert present.role_password.startswith("SCRAM-SHA-256$")
        else:
            assert present.role_password is None
        assert present.database_exists and present.database_owner == f"app_{tag}"
        assert present.database_comment == "a comment" and present.schema_owner is not None
