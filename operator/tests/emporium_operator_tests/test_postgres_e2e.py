"""PostgresServer and PostgresDatabase through the real operator (KopfRunner), API server and Postgres."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

PG_DB = "PostgresDatabase"


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


async def test_database_secret_connects_with_exactly_its_rights(kube, env, postgres):
    ns = env["ns"]
    kube.create(ns, PG_DB, "orders", {"serverRef": {"name": "pg"}, "extensions": ["citext"]})
    kube.create(ns, PG_DB, "users", {"serverRef": {"name": "pg"}, "databaseName": "users_db"})
    await kube.wait_ready(ns, PG_DB, "orders")
    await kube.wait_ready(ns, PG_DB, "users")
    secret = kube.secret(ns, "orders-db")
    assert set(secret) == {"uri", "DATABASE_URL", "host", "port", "dbname", "username", "password"}
    assert secret["dbname"] == "orders" and secret["username"] == "orders_owner"
    assert secret["uri"] == secret["DATABASE_URL"]
    conn = await asyncpg.connect(secret["uri"])
    try:
        await conn.execute("CREATE TABLE t (id serial primary key, name citext)")
        await conn.execute("INSERT INTO t (name) VALUES ('A')")
        assert await conn.fetchval("SELECT count(*) FROM t WHERE name = 'a'") == 1
        assert await conn.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname='public'"
        ) == ("orders_owner")
        assert not await conn.fetchval(
            "SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        )
    finally:
        await conn.close()
    # The orders role cannot even connect to the users database (CONNECT revoked from PUBLIC).
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(postgres.dsn("users_db", secret["username"], secret["password"]))
    labels = kube.core.read_namespaced_secret("orders-db", ns).metadata
    assert labels.labels["emporium.dev/managed"] == "true"
    assert labels.owner_references[0].kind == PG_DB
    out = kube.kubectl("get", "postgresdatabases", "-n", ns).stdout
    assert "orders-db" in out and "Provisioned" in out


async def test_update_adds_extension(kube, env, postgres):
    ns = env["ns"]
    await kube.wait_ready(ns, PG_DB, "orders")
    kube.patch_spec(ns, PG_DB, "orders", {"extensions": ["citext", "pgcrypto"]})
    await kube.wait_ready(ns, PG_DB, "orders")
    await kube.wait_for(
        lambda: "pgcrypto" in postgres.psql("SELECT extname FROM pg_extension", "orders"),
        what="pgcrypto installed",
    )


async def test_drift_repair_dropped_database_role_and_password(kube, env, postgres):
    ns = env["ns"]
    await kube.wait_ready(ns, PG_DB, "orders")
    postgres.psql("DROP DATABASE orders WITH (FORCE)")
    postgres.psql("DROP ROLE orders_owner")
    await kube.wait_for(
        lambda: postgres.psql("SELECT 1 FROM pg_database WHERE datname='orders'") == "1",
        within=30,
        what="database recreated",
    )
    obj = await kube.wait_for(
        lambda: (o := kube.get(ns, PG_DB, "orders"))["status"].get("driftRepairs", 0) >= 2 and o, within=30
    )
    assert obj["status"]["lastDriftRepair"]["objects"]
    # A password changed behind the operator's back is reset to the Secret's.
    postgres.psql("ALTER ROLE orders_owner PASSWORD 'tampered'")
    secret = kube.secret(ns, "orders-db")

    async def connects() -> bool:
        try:
            conn = await asyncpg.connect(secret["uri"])
        except asyncpg.InvalidPasswordError:
            return False
        await conn.close()
        return True

    for _ in range(60):
        if await connects():
            break
        await asyncio.sleep(0.5)
    assert await connects(), "the role's password was not reset to the Secret's"
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{env['metrics_port']}/metrics")).text
    for obj_label in ("database", "role", "password"):
        assert (
            f'emporium_operator_drift_repairs_total{{kind="PostgresDatabase",object="{obj_label}"}}' in text
        )


async def test_password_rotation_by_trigger(kube, env):
    ns = env["ns"]
    await kube.wait_ready(ns, PG_DB, "users")
    old = kube.secret(ns, "users-db")
    kube.patch_spec(ns, PG_DB, "users", {"passwordRotation": {"trigger": "2026-11-25"}})
    new = await kube.wait_for(
        lambda: (s := kube.secret(ns, "users-db"))["password"] != old["password"] and s,
        within=30,
        what="rotated password",
    )
    conn = await asyncpg.connect(new["uri"])
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(old["uri"])
    obj = await kube.wait_ready(ns, PG_DB, "users")
    assert obj["status"]["rotationTrigger"] == "2026-11-25"


async def test_retain_versus_delete_and_active_connections_block(kube, env, postgres):
    ns = env["ns"]
    kube.delete(ns, PG_DB, "users")  # reclaimPolicy defaults to Retain
    await kube.wait_gone(ns, PG_DB, "users")
    assert postgres.psql("SELECT 1 FROM pg_database WHERE datname='users_db'") == "1"
    await kube.wait_for(
        lambda: kube.secret(ns, "users-db") is None, within=30, what="Secret garbage-collected"
    )

    kube.create(ns, PG_DB, "scratch", {"serverRef": {"name": "pg"}, "reclaimPolicy": "Delete"})
    await kube.wait_ready(ns, PG_DB, "scratch")
    conn = await asyncpg.connect(kube.secret(ns, "scratch-db")["uri"])
    kube.delete(ns, PG_DB, "scratch")
    obj = await kube.wait_reason(ns, PG_DB, "scratch", "ActiveConnections", type_="DeletionBlocked")
    assert "active connection" in kube.condition(obj, "DeletionBlocked")["message"]
    await conn.close()
    await kube.wait_gone(ns, PG_DB, "scratch", within=30)
    assert postgres.psql("SELECT count(*) FROM pg_database WHERE datname='scratch'") == "0"
    assert postgres.psql("SELECT count(*) FROM pg_roles WHERE rolname='scratch_owner'") == "0"


async def test_deleted_secret_is_recreated_with_working_credentials(kube, env):
    ns = env["ns"]
    await kube.wait_ready(ns, PG_DB, "orders")
    kube.core.delete_namespaced_secret("orders-db", ns)
    secret = await kube.wait_for(lambda: kube.secret(ns, "orders-db"), within=20, what="Secret recreated")
    for _ in range(40):
        try:
            conn = await asyncpg.connect(secret["uri"])
        except asyncpg.InvalidPasswordError:
            await asyncio.sleep(0.5)
            continue
        await conn.close()
        break
    else:
        raise AssertionError("the recreated Secret's password never worked")
