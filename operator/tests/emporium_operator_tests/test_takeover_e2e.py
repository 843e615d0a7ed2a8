# ruff: noqa: S608 (test SQL with random suffixes, run as the superuser through psql)
"""No takeover: objects that would touch a role, database, vhost or broker user the operator does not own
are refused (Ready=False, reason Forbidden, a Warning Event) with nothing changed on the server, and the
servers' admin credentials keep working after every attempt."""

from __future__ import annotations

import urllib.error
import uuid

import asyncpg
import pytest
from kubernetes.client.rest import ApiException

PG_DB = "PostgresDatabase"
TOPO = "RabbitTopology"


async def admin_still_works(postgres, rabbitmq) -> None:
    conn = await asyncpg.connect(postgres.admin_dsn)
    try:
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    finally:
        await conn.close()
    who = rabbitmq.api("GET", "/api/whoami")
    assert who["name"] == rabbitmq.admin_user
    assert "administrator" in (who.get("tags") or [])


def forbidden_event(kube, ns: str, name: str) -> bool:
    events = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return any(e.reason == "Forbidden" and e.type == "Warning" for e in events)


async def refused(kube, ns: str, kind: str, name: str) -> dict:
    obj = await kube.wait_reason(ns, kind, name, "Forbidden")
    assert kube.condition(obj)["status"] == "False"
    await kube.wait_for(lambda: forbidden_event(kube, ns, name), within=10, what="Forbidden Warning Event")
    return obj


async def test_cel_refuses_reserved_names(kube, env):
    ns = env["ns"]
    for owner in ("postgres", "pg_monitor", "public"):
        with pytest.raises(ApiException) as info:
            kube.create(ns, PG_DB, "grab", {"serverRef": {"name": "pg"}, "owner": owner})
        assert info.value.status == 422 and "reserved roles" in info.value.body
    with pytest.raises(ApiException) as info:
        kube.create(ns, "RabbitVhost", "root", {"serverRef": {"name": "rabbit"}, "name": "/"})
    assert info.value.status == 422
    with pytest.raises(ApiException) as info:
        spec = {"serverRef": {"name": "rabbit"}, "vhost": "v", "user": {"name": "guest"}}
        kube.create(ns, TOPO, "guest", spec)
    assert info.value.status == 422


async def test_postgres_roles_and_databases_not_ours_are_refused(kube, env, postgres, rabbitmq):
    ns = env["ns"]
    tag = uuid.uuid4().hex[:6]
    # A powerful role, a plain role and a database that the operator did not create.
    postgres.psql(f"CREATE ROLE boss_{tag} LOGIN SUPERUSER PASSWORD 'boss-pw'")
    postgres.psql(f"CREATE ROLE app_{tag} LOGIN PASSWORD 'app-pw'")
    postgres.psql(f"CREATE ROLE repl_{tag} LOGIN REPLICATION PASSWORD 'repl-pw'")
    postgres.create_database(f"legacy_{tag}")
    attempts = {
        "boss": {"databaseName": f"boss_db_{tag}", "owner": f"boss_{tag}"},
        "app": {"databaseName": f"app_db_{tag}", "owner": f"app_{tag}", "reclaimPolicy": "Delete"},
        "repl": {"databaseName": f"repl_db_{tag}", "owner": f"repl_{tag}"},
        "legacy": {"databaseName": f"legacy_{tag}", "reclaimPolicy": "Delete"},
    }
    for name, spec in attempts.items():
        kube.create(ns, PG_DB, name, {"serverRef": {"name": "pg"}, **spec})
    for name in attempts:
        obj = await refused(kube, ns, PG_DB, name)
        assert "nothing was changed" in kube.condition(obj)["message"]
        assert kube.secret(ns, f"{name}-db") is None
        await admin_still_works(postgres, rabbitmq)
    # Nothing changed: passwords, attributes, no new databases, the legacy database keeps its owner.
    for role, pw in ((f"boss_{tag}", "boss-pw"), (f"app_{tag}", "app-pw"), (f"repl_{tag}", "repl-pw")):
        conn = await asyncpg.connect(postgres.dsn("postgres", role, pw))
        await conn.close()
    assert postgres.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '%_db_{tag}'") == "0"
    assert postgres.psql(f"SELECT rolsuper FROM pg_roles WHERE rolname = 'boss_{tag}'") == "t"
    assert (
        postgres.psql(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'legacy_{tag}'")
        == postgres.superuser
    )
    # Deleting the refused objects (reclaimPolicy Delete) drops nothing.
    for name in attempts:
        kube.delete(ns, PG_DB, name)
    for name in attempts:
        await kube.wait_gone(ns, PG_DB, name)
    assert postgres.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = 'app_{tag}'") == "1"
    assert postgres.psql(f"SELECT count(*) FROM pg_database WHERE datname = 'legacy_{tag}'") == "1"
    await admin_still_works(postgres, rabbitmq)


async def test_a_second_object_cannot_adopt_a_retained_database(kube, env, postgres, rabbitmq):
    ns = env["ns"]
    tag = uuid.uuid4().hex[:6]
    kube.create(ns, PG_DB, "first", {"serverRef": {"name": "pg"}, "databaseName": f"kept_{tag}"})
    await kube.wait_ready(ns, PG_DB, "first")
    kube.delete(ns, PG_DB, "first")  # Retain: the database and role stay, marked as first's
    await kube.wait_gone(ns, PG_DB, "first")
    kube.create(ns, PG_DB, "second", {"serverRef": {"name": "pg"}, "databaseName": f"kept_{tag}"})
    await refused(kube, ns, PG_DB, "second")
    kube.delete(ns, PG_DB, "second")
    await kube.wait_gone(ns, PG_DB, "second")
    # The same object (same namespace and name) adopts its retained database again.
    kube.create(ns, PG_DB, "first", {"serverRef": {"name": "pg"}, "databaseName": f"kept_{tag}"})
    await kube.wait_ready(ns, PG_DB, "first")
    await admin_still_works(postgres, rabbitmq)


async def test_a_secret_not_ours_is_never_read_or_written(kube, env, postgres, rabbitmq):
    ns = env["ns"]
    before = kube.core.read_namespaced_secret("pg-admin", ns)
    kube.create(ns, PG_DB, "steal", {"serverRef": {"name": "pg"}, "secretName": "pg-admin"})
    obj = await kube.wait_reason(ns, PG_DB, "steal", "Conflict")
    assert "not owned" in kube.condition(obj)["message"]
    after = kube.core.read_namespaced_secret("pg-admin", ns)
    assert after.data == before.data and after.metadata.resource_version == before.metadata.resource_version
    # The role was not created with the admin's password (nothing reached the server).
    assert postgres.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'steal_owner'") == "0"
    kube.delete(ns, PG_DB, "steal")
    await kube.wait_gone(ns, PG_DB, "steal")
    await admin_still_works(postgres, rabbitmq)


def api_or_none(rabbitmq, path: str):
    try:
        return rabbitmq.api("GET", path)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


async def test_broker_users_and_vhosts_not_ours_are_refused(kube, env, postgres, rabbitmq):
    ns = env["ns"]
    tag = uuid.uuid4().hex[:6]
    vhost = f"mine-{tag}"
    kube.create(ns, "RabbitVhost", "mine", {"serverRef": {"name": "rabbit"}, "name": vhost})
    await kube.wait_ready(ns, "RabbitVhost", "mine")
    rabbitmq.api("PUT", f"/api/users/monitor-{tag}", {"password": "mon-pw", "tags": "monitoring"})
    rabbitmq.api("PUT", f"/api/users/plain-{tag}", {"password": "plain-pw", "tags": ""})
    rabbitmq.api("PUT", f"/api/vhosts/foreign-{tag}", {"description": "someone else's"})
    attempts = {
        "admin": {"vhost": vhost, "user": {"name": rabbitmq.admin_user}, "reclaimPolicy": "Delete"},
        "monitor": {"vhost": vhost, "user": {"name": f"monitor-{tag}"}},
        "plain": {"vhost": vhost, "user": {"name": f"plain-{tag}"}},
        "root": {"vhost": "/", "queues": [{"name": f"root-{tag}"}]},
    }
    for name, spec in attempts.items():
        kube.create(ns, TOPO, name, {"serverRef": {"name": "rabbit"}, **spec})
    kube.create(ns, "RabbitVhost", "foreign", {"serverRef": {"name": "rabbit"}, "name": f"foreign-{tag}"})
    for name in attempts:
        await refused(kube, ns, TOPO, name)
        await admin_still_works(postgres, rabbitmq)
    await refused(kube, ns, "RabbitVhost", "foreign")
    # Nothing changed on the broker.
    assert rabbitmq.api("GET", f"/api/users/monitor-{tag}")["tags"] == ["monitoring"]
    assert rabbitmq.api("GET", f"/api/users/plain-{tag}")["tags"] == []
    assert api_or_none(rabbitmq, f"/api/permissions/{vhost}/plain-{tag}") is None
    assert api_or_none(rabbitmq, f"/api/queues/%2F/root-{tag}") is None
    assert rabbitmq.api("GET", f"/api/vhosts/foreign-{tag}")["description"] == "someone else's"
    # Deleting them deletes nothing either (the admin topology had reclaimPolicy Delete).
    for name in attempts:
        kube.delete(ns, TOPO, name)
    kube.delete(ns, "RabbitVhost", "foreign")
    for name in attempts:
        await kube.wait_gone(ns, TOPO, name)
    await kube.wait_gone(ns, "RabbitVhost", "foreign")
    assert api_or_none(rabbitmq, f"/api/users/monitor-{tag}") is not None
    assert api_or_none(rabbitmq, f"/api/users/plain-{tag}") is not None
    assert api_or_none(rabbitmq, f"/api/vhosts/foreign-{tag}") is not None
    await admin_still_works(postgres, rabbitmq)
