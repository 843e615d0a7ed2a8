"""Pure logic: SQL planning and quoting, SCRAM and RabbitMQ hashes, policies, conditions, URIs."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import unquote, urlparse

import pytest
from emporium_operator import conditions, postgres, rabbit
from emporium_operator.secrets import amqp_uri, parse_duration, postgres_uri, secret_manifest


def test_quote_ident_neutralises_injection():
    assert postgres.quote_ident('x"; DROP DATABASE postgres; --') == '"x""; DROP DATABASE postgres; --"'
    assert postgres.quote_ident("Order-DB") == '"Order-DB"'
    for bad in ("", "a\x00b", "x" * 64):
        with pytest.raises(postgres.InvalidName):
            postgres.quote_ident(bad)
    assert postgres.quote_literal("it's") == "'it''s'"


def test_scram_verifier_round_trip():
    v = postgres.scram_verifier("s3cret", salt=b"0123456789abcdef")
    assert v.startswith("SCRAM-SHA-256$4096:")
    assert postgres.scram_matches(v, "s3cret")
    assert not postgres.scram_matches(v, "other")
    assert not postgres.scram_matches(None, "s3cret")
    assert not postgres.scram_matches("md5abc", "s3cret")


def test_plan_fresh_database_creates_everything_in_order():
    marker = postgres.ownership_marker("PostgresDatabase ns/orders")
    desired = postgres.DesiredDatabase("orders", "orders_owner", "not-in-base64", ("citext",), marker)
    steps = postgres.plan(postgres.ObservedDatabase(), desired)
    assert [s.obj for s in steps] == [
        "role",
        "database",
        "ownership",
        "privileges",
        "role",
        "schema",
        "schema",
        "extension",
    ]
    # NOLOGIN until its password is set (after CREATE DATABASE, while the new database is being connected to).
    assert steps[0].sql.startswith('CREATE ROLE "orders_owner" NOSUPERUSER')
    assert " NOLOGIN;" in steps[0].sql and "PASSWORD" not in steps[0].sql
    # The role is never without its ownership comment (one implicit transaction).
    assert steps[0].sql.endswith(f"; COMMENT ON ROLE \"orders_owner\" IS '{marker}'")
    assert steps[1].sql == 'CREATE DATABASE "orders" OWNER "orders_owner"'
    assert steps[2].sql == f"COMMENT ON DATABASE \"orders\" IS '{marker}'"
    assert steps[4].dbname is None and steps[4].sql.startswith('ALTER ROLE "orders_owner" LOGIN PASSWORD ')
    assert "'SCRAM-SHA-256$4096:" in steps[4].sql
    assert "not-in-base64" not in steps[4].sql  # only the SCRAM verifier travels ('-' is not base64)
    assert steps[5].dbname == "orders" and steps[5].sql == 'ALTER SCHEMA public OWNER TO "orders_owner"'
    assert steps[7].sql == 'CREATE EXTENSION IF NOT EXISTS "citext"'
    # A role recreated for an existing database gets LOGIN and its password at once.
    kept = postgres.ObservedDatabase(
        database_exists=True, database_owner="orders_owner", database_comment=marker, schema_owner="x"
    )
    role_step = postgres.plan(kept, desired)[0]
    assert role_step.obj == "role" and " LOGIN PASSWORD 'SCRAM-SHA-256$" in role_step.sql


def test_takeover_rules():
    marker = postgres.ownership_marker("PostgresDatabase ns/orders")
    desired = postgres.DesiredDatabase("orders", "orders_owner", "pw", (), marker)
    fresh = postgres.ObservedDatabase()
    assert postgres.takeover(fresh, desired) is None
    ours = postgres.ObservedDatabase(
        role_exists=True, role_comment=marker, database_exists=True, database_owner="orders_owner"
    )
    assert postgres.takeover(ours, desired) is None  # database without comment, owned by our role
    ours.database_comment = "someone else's"
    assert "database" in postgres.takeover(ours, desired)
    foreign = postgres.ObservedDatabase(role_exists=True, role_comment=None)
    assert "not created by the operator" in postgres.takeover(foreign, desired)
    other_object = postgres.ObservedDatabase(
        role_exists=True, role_comment=postgres.ownership_marker("PostgresDatabase other/orders")
    )
    assert postgres.takeover(other_object, desired)
    # A role made by an earlier version (no comment) is adopted only with the password of our own Secret.
    legacy = postgres.ObservedDatabase(role_exists=True, role_password=postgres.scram_verifier("pw"))
    assert postgres.takeover(legacy, desired)
    adopting = postgres.DesiredDatabase("orders", "orders_owner", "pw", (), marker, password_from_secret=True)
    assert postgres.takeover(legacy, adopting) is None
    assert next(s.obj for s in postgres.plan(legacy, adopting)) == "ownership"
    wrong = postgres.DesiredDatabase("orders", "orders_owner", "guess", (), marker, password_from_secret=True)
    assert postgres.takeover(legacy, wrong)
    powerful = postgres.ObservedDatabase(role_exists=True, role_comment=marker, role_powers=["SUPERUSER"])
    assert "SUPERUSER" in postgres.takeover(powerful, desired)
    assert postgres.reserved_role("postgres", "admin") and postgres.reserved_role("pg_monitor", "admin")
    assert postgres.reserved_role("admin", "admin") and not postgres.reserved_role("orders_owner", "admin")
    tag = rabbit.owner_tag("ns/orders")
    assert rabbit.user_takeover(None, "orders", tag, "admin") is None
    assert rabbit.user_takeover({"tags": [tag]}, "orders", tag, "admin") is None
    assert "admin user" in rabbit.user_takeover(None, "admin", tag, "admin")
    assert "tags" in rabbit.user_takeover({"tags": ["administrator"]}, "orders", tag, "admin")
    assert rabbit.user_takeover({"tags": []}, "orders", tag, "admin")
    assert rabbit.user_takeover({"tags": [rabbit.owner_tag("x/orders")]}, "orders", tag, "admin")
    old = {"tags": [], "password_hash": rabbit.password_hash("pw")}
    assert rabbit.user_takeover(old, "orders", tag, "admin", known_password="pw") is None
    assert rabbit.user_takeover(old, "orders", tag, "admin", known_password="guess")
    assert rabbit.user_takeover({**old, "tags": ["management"]}, "orders", tag, "admin", known_password="pw")


def test_plan_converged_is_empty_and_drift_is_targeted():
    desired = postgres.DesiredDatabase("orders", "orders_owner", "pw", ("citext",), "m")
    good = postgres.ObservedDatabase(
        database_comment="m",
        role_comment="m",  # both marked as ours
        role_exists=True,
        role_can_login=True,
        role_password=postgres.scram_verifier("pw"),
        database_exists=True,
        database_owner="orders_owner",
        database_acl=["orders_owner=CTc/orders_owner"],
        schema_owner="orders_owner",
        schema_acl=["orders_owner=UC/orders_owner"],
        extensions={"plpgsql", "citext"},
    )
    assert postgres.plan(good, desired) == []
    good.role_password = postgres.scram_verifier("changed")
    good.schema_acl = ["orders_owner=UC/orders_owner", "=U/orders_owner"]
    assert [s.obj for s in postgres.plan(good, desired)] == ["password", "schema"]
    good.database_acl = None  # default ACL: PUBLIC can connect
    assert "privileges" in [s.obj for s in postgres.plan(good, desired)]


def test_rabbit_password_hash_matches_broker_format():
    h = rabbit.password_hash("pw", salt=b"abcd")
    assert base64.b64decode(h) == b"abcd" + hashlib.sha256(b"abcdpw").digest()
    assert rabbit.password_matches(h, "pw") and not rabbit.password_matches(h, "nope")


def test_queue_policy_compiles_tunables():
    assert rabbit.queue_policy({"name": "plain"}) is None
    p = rabbit.queue_policy(
        {
            "name": "orders.events",
            "deadLetter": {"exchange": "dlx", "routingKey": "rk"},
            "messageTtl": 60000,
            "maxLength": 10,
            "deliveryLimit": 5,
        }
    )
    assert p["pattern"] == r"^orders\.events$" and p["apply-to"] == "queues"
    assert p["definition"] == {
        "dead-letter-exchange": "dlx",
        "dead-letter-routing-key": "rk",
        "message-ttl": 60000,
        "max-length": 10,
        "delivery-limit": 5,
    }


def test_desired_topology_expands_dead_letter_shorthand_and_least_privilege():
    spec = {
        "vhost": "emporium",
        "exchanges": [{"name": "emporium.events", "type": "topic"}],
        "queues": [{"name": "n.events", "deadLetter": {"exchange": "n.dlx"}}],
        "deadLetter": {"exchange": "n.dlx", "queue": "n.dlq"},
        "bindings": [{"source": "emporium.events", "destination": "n.events", "routingKey": "order.#"}],
    }
    t = rabbit.desired_topology(spec, "notifications", "pw")
    assert t.user == "notifications"
    assert {e["name"] for e in t.exchanges} == {"emporium.events", "n.dlx"}
    assert {q["name"] for q in t.queues} == {"n.events", "n.dlq"}
    assert ("n.dlx", "n.dlq", "queue", "#") in {rabbit.binding_key(b) for b in t.bindings}
    assert t.permissions == {
        "configure": "^$",
        "write": r"^(emporium\.events|n\.dlx)$",
        "read": r"^(n\.dlq|n\.events)$",
    }
    assert set(t.policies) == {"emporium-queue.n.events"}


def test_management_paths_cannot_escape_the_vhost():
    assert rabbit.q("../../api/users") == "..%2F..%2Fapi%2Fusers"
    assert rabbit.q("/") == "%2F"


def test_conditions_keep_transition_time_when_status_is_unchanged():
    c1 = conditions.set_condition(
        [], "Ready", False, "ServerUnreachable", "down", 1, now="2026-01-01T00:00:00Z"
    )
    c2 = conditions.set_condition(
        c1, "Ready", False, "ServerUnreachable", "still", 1, now="2026-01-01T00:01:00Z"
    )
    assert c2[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and c2[0]["message"] == "still"
    c3 = conditions.set_condition(c2, "Ready", True, "Provisioned", "ok", 2, now="2026-01-01T00:02:00Z")
    assert c3[0]["lastTransitionTime"] == "2026-01-01T00:02:00Z" and c3[0]["status"] == "True"
    c4 = conditions.set_condition(c3, "Conflict", True, "Conflict", "x")
    assert [c["type"] for c in c4] == ["Ready", "Conflict"]
    assert conditions.remove_condition(c4, "Conflict") == c3


def test_uris_percent_encode_credentials_and_vhost():
    uri = postgres_uri("u@x", "p:/?#%", "db.local", 5432, "orders")
    parsed = urlparse(uri)
    assert unquote(parsed.username) == "u@x" and unquote(parsed.password) == "p:/?#%"
    assert parsed.path == "/orders"
    assert amqp_uri("svc", "pw", "rmq", 5672, "/") == "amqp://svc:pw@rmq:5672/%2F"
    assert postgres_uri("u", "p", "h", 1, "d", "require").endswith("?sslmode=require")


def test_parse_duration():
    assert parse_duration("720h") == 720 * 3600
    assert parse_duration("1d2h3m4s") == 86400 + 7200 + 180 + 4
    assert parse_duration(None) is None
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_secret_manifest_has_label_and_owner():
    owner = {
        "apiVersion": "emporium.dev/v1alpha1",
        "kind": "PostgresDatabase",
        "metadata": {"name": "orders", "uid": "u-1"},
    }
    m = secret_manifest("orders-db", "ns", owner, {"password": "pw"})
    assert m["metadata"]["labels"]["emporium.dev/managed"] == "true"
    assert m["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert base64.b64decode(m["data"]["password"]) == b"pw"


def test_claims_conflict_across_namespaces_on_the_same_physical_server():
    from emporium_operator.common import claim_winner as _claim_winner

    servers = {("a", "pg"): "db:5432", ("b", "pg2"): "db:5432", ("c", "pg"): "other:5432"}

    def endpoint_of(key):
        return servers.get(key)

    claims = [
        ("2026-01-02T00:00:00Z", "a", "orders", ("a", "pg")),
        ("2026-01-01T00:00:00Z", "b", "orders-copy", ("b", "pg2")),  # earlier, same physical server
        ("2025-01-01T00:00:00Z", "c", "orders", ("c", "pg")),  # earliest, but another server
    ]
    assert _claim_winner(claims, "a", "orders", endpoint_of) == "b/orders-copy"
    assert _claim_winner(claims, "b", "orders-copy", endpoint_of) is None
    assert _claim_winner(claims, "c", "orders", endpoint_of) is None
    assert _claim_winner(claims, "x", "unknown", endpoint_of) is None


def test_rotation_due_by_trigger_and_interval():
    import datetime as dt

    from emporium_operator.common import rotation_due as _rotation_due

    now = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    assert _rotation_due({}, {}, now) == (False, None)
    assert _rotation_due({"passwordRotation": {"trigger": "a"}}, {"rotationTrigger": "a"}, now) == (
        False,
        "a",
    )
    assert _rotation_due({"passwordRotation": {"trigger": "b"}}, {"rotationTrigger": "a"}, now) == (True, "b")
    spec = {"passwordRotation": {"interval": "1h"}}
    assert _rotation_due(spec, {"passwordRotatedAt": "2026-11-25T11:30:00Z"}, now) == (False, None)
    assert _rotation_due(spec, {"passwordRotatedAt": "2026-11-25T10:59:00Z"}, now) == (True, None)


def test_binding_keys_and_credentials_hash():
    from emporium_operator import pg_database
    from emporium_operator.secrets import credentials_hash

    conn = postgres.ServerConn("db.example", 5432, "admin", "x", sslmode="require")
    data = pg_database.binding_data("app", "p:w", conn, "orders")
    assert data["type"] == "postgresql" and data["provider"] == "emporium-operator"
    assert data["database"] == data["dbname"] == "orders"
    assert (
        data["jdbc-uri"] == "jdbc:postgresql://db.example:5432/orders?user=app&password=p%3Aw&sslmode=require"
    )
    assert data["pgpass"] == "db.example:5432:orders:app:p\\:w\n"
    assert credentials_hash(data) == credentials_hash(dict(reversed(data.items())))
    assert credentials_hash(data) != credentials_hash({**data, "password": "other"})


def test_label_selectors_for_allowed_namespaces():
    from emporium_operator.common import selector_matches

    labels = {"team": "shop", "env": "prod"}
    assert selector_matches({"matchLabels": {"team": "shop"}}, labels)
    assert not selector_matches({"matchLabels": {"team": "ops"}}, labels)
    assert selector_matches(
        {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}, labels
    )
    assert not selector_matches(
        {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}, labels
    )
    assert selector_matches({"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "x", "operator": "Exists"}]}, labels)


async def test_engine_schedules_new_changed_and_ready_objects():
    from emporium_operator.engine import Engine

    engine = Engine()

    def body(name, generation=1, ready=False):
        status = {}
        if ready:
            status = {
                "observedGeneration": generation,
                "conditions": [{"type": "Ready", "status": "True", "reason": "Provisioned"}],
            }
        return {
            "metadata": {
                "namespace": "ns",
                "name": name,
                "uid": name,
                "generation": generation,
                "resourceVersion": "1",
            },
            "spec": {},
            "status": status,
        }

    engine.observe("x", None, body("new"))
    engine.observe("x", None, body("done", ready=True))
    assert engine.due[("x", "ns", "new")] <= engine.due[("x", "ns", "done")]
    engine.due.clear()
    engine.observe("x", "MODIFIED", body("done", ready=True))  # status-only change: nothing to do
    assert ("x", "ns", "done") not in engine.due
    engine.observe("x", "MODIFIED", body("done", generation=2, ready=True))  # spec changed
    assert ("x", "ns", "done") in engine.due
    engine.observe("x", "DELETED", body("done", generation=2))
    assert ("x", "ns", "done") not in engine.bodies and ("x", "ns", "done") not in engine.due
    from emporium_operator.common import RETRY_MAX, RETRY_MIN

    delays = [engine._backoff(("x", "ns", "new")) for _ in range(7)]
    assert delays[0] == RETRY_MIN and delays[-1] == RETRY_MAX  # from the first retry, doubling, capped
    assert delays == sorted(delays)
