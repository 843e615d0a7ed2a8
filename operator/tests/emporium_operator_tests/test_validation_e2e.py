"""CEL rejections, InvalidSpec, conflicts and a server that goes away and comes back."""

from __future__ import annotations

import pytest
from kubernetes.client.rest import ApiException

PG_DB = "PostgresDatabase"


def rejected(fn) -> str:
    with pytest.raises(ApiException) as info:
        fn()
    assert info.value.status == 422, info.value.body
    return info.value.body


async def test_cel_rejects_invalid_values_and_immutable_changes(kube, env):
    ns = env["ns"]
    body = rejected(
        lambda: kube.create(ns, PG_DB, "bad", {"serverRef": {"name": "pg"}, "databaseName": "postgres"})
    )
    assert "must not be postgres" in body
    body = rejected(
        lambda: kube.create(ns, PG_DB, "bad", {"serverRef": {"name": "pg"}, "reclaimPolicy": "Maybe"})
    )
    assert "reclaimPolicy" in body
    rejected(
        lambda: kube.create(
            ns, PG_DB, "bad", {"serverRef": {"name": "pg"}, "passwordRotation": {"interval": "soon"}}
        )
    )
    body = rejected(
        lambda: kube.create(
            ns,
            "RabbitTopology",
            "bad",
            {
                "serverRef": {"name": "rabbit"},
                "vhost": "v",
                "queues": [{"name": "q", "type": "quorum", "durable": False}],
            },
        )
    )
    assert "quorum queues must be durable" in body
    rejected(
        lambda: kube.create(
            ns,
            "RabbitTopology",
            "bad",
            {"serverRef": {"name": "rabbit"}, "vhost": "v", "queues": [{"name": "amq.q"}]},
        )
    )

    kube.create(ns, PG_DB, "immut", {"serverRef": {"name": "pg"}, "databaseName": "immut_db"})
    body = rejected(lambda: kube.patch_spec(ns, PG_DB, "immut", {"databaseName": "other"}))
    assert "databaseName is immutable" in body
    assert "serverRef is immutable" in rejected(
        lambda: kube.patch_spec(ns, PG_DB, "immut", {"serverRef": {"name": "x"}})
    )
    await kube.wait_ready(ns, PG_DB, "immut")
    kube.create(ns, "RabbitTopology", "immut", {"serverRef": {"name": "rabbit"}, "vhost": "v1"})
    assert "vhost is immutable" in rejected(
        lambda: kube.patch_spec(ns, "RabbitTopology", "immut", {"vhost": "v2"})
    )
    explain = kube.kubectl("explain", "postgresdatabases.spec.reclaimPolicy").stdout
    assert "Retain" in explain
    kube.delete(ns, "RabbitTopology", "immut")
    await kube.wait_gone(ns, "RabbitTopology", "immut")


async def test_invalid_spec_that_cel_cannot_catch(kube, env):
    ns = env["ns"]
    kube.create(ns, PG_DB, "noext", {"serverRef": {"name": "pg"}, "extensions": ["no_such_extension"]})
    obj = await kube.wait_reason(ns, PG_DB, "noext", "InvalidSpec")
    assert "no_such_extension" in kube.condition(obj)["message"]
    # Fixing the spec recovers.
    kube.patch_spec(ns, PG_DB, "noext", {"extensions": ["hstore"]})
    await kube.wait_ready(ns, PG_DB, "noext")


async def test_conflicting_databases(kube, env):
    ns = env["ns"]
    kube.create(ns, PG_DB, "first", {"serverRef": {"name": "pg"}, "databaseName": "shared_db"})
    await kube.wait_ready(ns, PG_DB, "first")
    kube.create(
        ns,
        PG_DB,
        "second",
        {
            "serverRef": {"name": "pg"},
            "databaseName": "shared_db",
            "owner": "other_owner",
            "reclaimPolicy": "Delete",
        },
    )
    obj = await kube.wait_reason(ns, PG_DB, "second", "Conflict")
    assert "first" in kube.condition(obj)["message"]
    assert kube.condition(obj, "Conflict")["status"] == "True"
    assert kube.secret(ns, "second-db") is None
    kube.delete(ns, PG_DB, "second")  # reclaimPolicy Delete, but it owns nothing: the database stays
    await kube.wait_gone(ns, PG_DB, "second")
    await kube.wait_ready(ns, PG_DB, "first")
    assert kube.secret(ns, "first-db")


async def test_server_unreachable_then_back(kube, env, postgres):
    ns = env["ns"]
    postgres.stop()
    try:
        kube.create(ns, PG_DB, "patient", {"serverRef": {"name": "pg"}})
        obj = await kube.wait_reason(ns, PG_DB, "patient", "ServerUnreachable", within=30)
        assert "cannot connect" in kube.condition(obj)["message"]
        await kube.wait_reason(ns, "PostgresServer", "pg", "ServerUnreachable", within=30)
        kube.create(ns, PG_DB, "orphan", {"serverRef": {"name": "missing"}})
        await kube.wait_reason(ns, PG_DB, "orphan", "ServerNotFound")
    finally:
        postgres.start()
    await kube.wait_ready(ns, PG_DB, "patient", within=40)
    await kube.wait_ready(ns, "PostgresServer", "pg", within=40)
    events = kube.core.list_namespaced_event(ns, field_selector="involvedObject.name=patient").items
    assert any(e.reason == "ServerUnreachable" and e.type == "Warning" for e in events)
    # A server that is gone does not leave finalizers stuck.
    kube.create(ns, PG_DB, "stranded", {"serverRef": {"name": "temp"}, "reclaimPolicy": "Delete"})
    kube.delete(ns, PG_DB, "orphan")
    await kube.wait_gone(ns, PG_DB, "orphan")
    kube.delete(ns, PG_DB, "stranded")
    await kube.wait_gone(ns, PG_DB, "stranded")


async def test_broker_unreachable_then_back(kube, env, rabbitmq):
    ns = env["ns"]
    kube.create(ns, "RabbitVhost", "outage", {"serverRef": {"name": "rabbit"}, "name": f"outage-{ns}"})
    await kube.wait_ready(ns, "RabbitVhost", "outage")
    rabbitmq.stop()
    try:
        kube.create(
            ns,
            "RabbitTopology",
            "outage",
            {"serverRef": {"name": "rabbit"}, "vhost": f"outage-{ns}", "queues": [{"name": "outage.q"}]},
        )
        obj = await kube.wait_reason(ns, "RabbitTopology", "outage", "ServerUnreachable", within=30)
        assert "management API" in kube.condition(obj)["message"]
    finally:
        rabbitmq.start()
    await kube.wait_ready(ns, "RabbitTopology", "outage", within=60)
    assert rabbitmq.api("GET", f"/api/queues/outage-{ns}/outage.q")["name"] == "outage.q"


async def test_hostile_names_are_quoted_not_executed(kube, env, postgres, rabbitmq):
    import asyncpg

    ns = env["ns"]
    evil = 'we"ird; DROP DATABASE postgres; --'
    kube.create(ns, PG_DB, "evil", {"serverRef": {"name": "pg"}, "databaseName": evil, "owner": "o'wner\"x"})
    await kube.wait_ready(ns, PG_DB, "evil")
    assert (
        postgres.psql(
            "SELECT count(*) FROM pg_database WHERE datname IN ('postgres', 'we\"ird; DROP DATABASE "
            "postgres; --')"
        )
        == "2"
    )
    secret = kube.secret(ns, "evil-db")
    assert secret["dbname"] == evil
    conn = await asyncpg.connect(secret["uri"])
    try:
        assert await conn.fetchval("SELECT current_database()") == evil
        assert await conn.fetchval("SELECT current_user") == "o'wner\"x"
    finally:
        await conn.close()
    # A vhost name with a slash stays one path segment of the management API.
    kube.create(ns, "RabbitVhost", "slash", {"serverRef": {"name": "rabbit"}, "name": f"../{ns}/x"})
    await kube.wait_ready(ns, "RabbitVhost", "slash")
    names = [v["name"] for v in rabbitmq.api("GET", "/api/vhosts")]
    assert f"../{ns}/x" in names


async def test_server_objects_update_and_delete(kube, env, postgres, rabbitmq):
    ns = env["ns"]
    closed = kube.free_port()
    kube.create(
        ns,
        "PostgresServer",
        "pg2",
        {
            "host": postgres.host,
            "port": postgres.port,
            "sslMode": "disable",
            "adminSecretRef": {"name": "pg-admin"},
        },
    )
    kube.create(
        ns,
        "RabbitServer",
        "rabbit2",
        {
            "managementUrl": rabbitmq.management_url,
            "amqpHost": "x",
            "adminSecretRef": {"name": "rabbit-admin"},
        },
    )
    await kube.wait_ready(ns, "PostgresServer", "pg2")
    await kube.wait_ready(ns, "RabbitServer", "rabbit2")
    kube.patch_spec(ns, "PostgresServer", "pg2", {"port": closed})
    kube.patch_spec(ns, "RabbitServer", "rabbit2", {"managementUrl": f"http://127.0.0.1:{closed}"})
    await kube.wait_reason(ns, "PostgresServer", "pg2", "ServerUnreachable")
    await kube.wait_reason(ns, "RabbitServer", "rabbit2", "ServerUnreachable")
    kube.patch_spec(ns, "PostgresServer", "pg2", {"port": postgres.port})
    kube.patch_spec(ns, "RabbitServer", "rabbit2", {"managementUrl": rabbitmq.management_url})
    await kube.wait_ready(ns, "PostgresServer", "pg2", within=40)
    await kube.wait_ready(ns, "RabbitServer", "rabbit2", within=40)
    kube.delete(ns, "PostgresServer", "pg2")
    kube.delete(ns, "RabbitServer", "rabbit2")
    await kube.wait_gone(ns, "PostgresServer", "pg2")
    await kube.wait_gone(ns, "RabbitServer", "rabbit2")
