"""RabbitServer, RabbitVhost and RabbitTopology through the real operator, API server and RabbitMQ."""

from __future__ import annotations

import asyncio
import urllib.error
from pathlib import Path

import aio_pika
import httpx
import pytest
import yaml
from aiormq.exceptions import ChannelAccessRefused

TOPO = "RabbitTopology"
CHART_TOPOLOGIES = {
    path.parent.parent.name: yaml.safe_load(path.read_text())
    for path in sorted((Path(__file__).resolve().parents[3] / "charts").glob("*/files/rabbit-topology.yaml"))
}


def orders_spec(vhost: str) -> dict:
    return {
        "serverRef": {"name": "rabbit"},
        "vhost": vhost,
        "reclaimPolicy": "Delete",
        "exchanges": [{"name": "emporium.events", "type": "topic"}],
        "queues": [
            {"name": "orders.events", "type": "quorum", "messageTtl": 60000, "deliveryLimit": 5},
            {"name": "orders.audit", "type": "classic"},
        ],
        "bindings": [
            {"source": "emporium.events", "destination": "orders.events", "routingKey": "user.#"},
            {"source": "emporium.events", "destination": "orders.audit", "routingKey": "#"},
        ],
    }


def notifications_spec(vhost: str) -> dict:
    return {
        "serverRef": {"name": "rabbit"},
        "vhost": vhost,
        "exchanges": [{"name": "emporium.events", "type": "topic"}],
        "queues": [
            {
                "name": "notifications.events",
                "deadLetter": {"exchange": "notifications.dlx", "routingKey": "notifications.events"},
            },
        ],
        "deadLetter": {"exchange": "notifications.dlx", "queue": "notifications.dlq"},
        "bindings": [
            {"source": "emporium.events", "destination": "notifications.events", "routingKey": "order.#"}
        ],
    }


def api_get(rabbitmq, path: str):
    try:
        return rabbitmq.api("GET", path)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


@pytest.fixture(scope="module")
async def vhost(kube, env, rabbitmq):
    ns = env["ns"]
    kube.create(ns, "RabbitVhost", "emporium", {"serverRef": {"name": "rabbit"}, "name": f"emporium-{ns}"})
    obj = await kube.wait_ready(ns, "RabbitVhost", "emporium")
    return obj["status"]["vhost"]


async def test_server_and_vhost_ready(kube, env, vhost, rabbitmq):
    obj = await kube.wait_ready(env["ns"], "RabbitServer", "rabbit")
    assert obj["status"]["version"]
    assert api_get(rabbitmq, f"/api/vhosts/{vhost}") is not None


async def test_topology_secret_works_with_least_privilege(kube, env, vhost, rabbitmq):
    ns = env["ns"]
    kube.create(ns, TOPO, "orders", orders_spec(vhost))
    kube.create(ns, TOPO, "notifications", notifications_spec(vhost))
    await kube.wait_ready(ns, TOPO, "orders")
    obj = await kube.wait_ready(ns, TOPO, "notifications")
    assert obj["status"]["queues"] == 2
    secret = kube.secret(ns, "notifications-amqp")
    assert set(secret) == {"uri", "AMQP_URL", "host", "port", "vhost", "username", "password"}
    assert secret["vhost"] == vhost and secret["username"] == "notifications"
    policy = api_get(rabbitmq, f"/api/policies/{vhost}/emporium-queue.orders.events")
    assert policy["definition"] == {"message-ttl": 60000, "delivery-limit": 5}
    dl = api_get(rabbitmq, f"/api/policies/{vhost}/emporium-queue.notifications.events")
    assert dl["definition"]["dead-letter-exchange"] == "notifications.dlx"

    orders = kube.secret(ns, "orders-amqp")
    conn = await aio_pika.connect(orders["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        exchange = await channel.get_exchange("emporium.events", ensure=False)
        await exchange.publish(aio_pika.Message(b'{"x": 1}'), routing_key="order.created")
    conn = await aio_pika.connect(secret["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        queue = await channel.get_queue("notifications.events", ensure=False)
        message = await queue.get(timeout=5, fail=False)
        for _ in range(20):
            if message:
                break
            await asyncio.sleep(0.25)
            message = await queue.get(timeout=5, fail=False)
        assert message and message.body == b'{"x": 1}'
        await message.ack()
    # notifications may not read the orders service's queue, nor declare anything.
    conn = await aio_pika.connect(secret["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        with pytest.raises(ChannelAccessRefused):
            queue = await channel.get_queue("orders.audit", ensure=False)
            await queue.get(timeout=5, fail=False)
    conn = await aio_pika.connect(secret["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        with pytest.raises(ChannelAccessRefused):
            await channel.declare_queue("rogue", durable=True)


async def test_update_prunes_and_changes_policy(kube, env, vhost, rabbitmq):
    ns = env["ns"]
    spec = orders_spec(vhost)
    spec["queues"] = [{"name": "orders.events", "type": "quorum", "messageTtl": 600000}]
    spec["bindings"] = spec["bindings"][:1]
    kube.custom.replace_namespaced_custom_object(
        "emporium.dev",
        "v1alpha1",
        ns,
        "rabbittopologies",
        "orders",
        {**kube.get(ns, TOPO, "orders"), "spec": spec},
    )
    await kube.wait_ready(ns, TOPO, "orders")
    policy = api_get(rabbitmq, f"/api/policies/{vhost}/emporium-queue.orders.events")
    assert policy["definition"] == {"message-ttl": 600000}
    # orders.audit (bound with "#") still holds the message published above: kept and reported.
    obj = kube.get(ns, TOPO, "orders")
    assert obj["status"]["retainedQueues"] == ["orders.audit"]
    assert "orders.audit" in kube.condition(obj)["message"]
    assert api_get(rabbitmq, f"/api/queues/{vhost}/orders.audit") is not None
    rabbitmq.api("DELETE", f"/api/queues/{vhost}/orders.audit/contents")
    # Once empty, the drift check prunes it (reclaimPolicy Delete).
    await kube.wait_for(
        lambda: api_get(rabbitmq, f"/api/queues/{vhost}/orders.audit") is None,
        within=30,
        what="orders.audit pruned",
    )
    bindings = rabbitmq.api("GET", f"/api/bindings/{vhost}")
    assert not [b for b in bindings if b["destination"] == "orders.audit"]


async def test_drift_repair_queue_binding_user_and_permission(kube, env, vhost, rabbitmq):
    ns = env["ns"]
    await kube.wait_ready(ns, TOPO, "notifications")
    rabbitmq.api("DELETE", f"/api/queues/{vhost}/notifications.events")
    rabbitmq.api("DELETE", f"/api/permissions/{vhost}/notifications")
    bindings = rabbitmq.api("GET", f"/api/bindings/{vhost}/e/notifications.dlx/q/notifications.dlq")
    for b in bindings:
        rabbitmq.api(
            "DELETE", f"/api/bindings/{vhost}/e/notifications.dlx/q/notifications.dlq/{b['properties_key']}"
        )

    def repaired():
        return (
            api_get(rabbitmq, f"/api/queues/{vhost}/notifications.events")
            and rabbitmq.api("GET", f"/api/bindings/{vhost}/e/notifications.dlx/q/notifications.dlq")
            and api_get(rabbitmq, f"/api/permissions/{vhost}/notifications")
            and api_get(rabbitmq, f"/api/bindings/{vhost}/e/emporium.events/q/notifications.events")
        )

    await kube.wait_for(repaired, within=30, what="queue, bindings and permission recreated")
    obj = await kube.wait_for(
        lambda: (o := kube.get(ns, TOPO, "notifications"))["status"].get("driftRepairs", 0) >= 3 and o,
        within=30,
    )
    assert obj["status"]["lastDriftRepair"]["objects"]
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{env['metrics_port']}/metrics")).text
    for obj_label in ("queue", "binding", "permission"):
        assert f'emporium_operator_drift_repairs_total{{kind="RabbitTopology",object="{obj_label}"}}' in text
    # A password changed on the broker is reset to the Secret's.
    rabbitmq.api("PUT", "/api/users/notifications", {"password": "tampered", "tags": ""})
    secret = kube.secret(ns, "notifications-amqp")
    for _ in range(60):
        try:
            conn = await aio_pika.connect(secret["uri"], timeout=5)
        except Exception:  # ProbableAuthenticationError until the reset
            await asyncio.sleep(0.5)
            continue
        await conn.close()
        break
    else:
        raise AssertionError("the broker password was not reset to the Secret's")


async def test_vhost_missing_then_created(kube, env, rabbitmq):
    ns = env["ns"]
    late = f"late-{ns}"
    kube.create(
        ns, TOPO, "late", {"serverRef": {"name": "rabbit"}, "vhost": late, "queues": [{"name": "late.q"}]}
    )
    obj = await kube.wait_reason(ns, TOPO, "late", "VhostMissing")
    assert late in kube.condition(obj)["message"]
    kube.create(
        ns, "RabbitVhost", "late", {"serverRef": {"name": "rabbit"}, "name": late, "reclaimPolicy": "Delete"}
    )
    await kube.wait_ready(ns, TOPO, "late", within=30)
    assert api_get(rabbitmq, f"/api/queues/{late}/late.q")
    kube.delete(ns, TOPO, "late")
    await kube.wait_gone(ns, TOPO, "late")
    kube.delete(ns, "RabbitVhost", "late")
    await kube.wait_gone(ns, "RabbitVhost", "late")
    assert api_get(rabbitmq, f"/api/vhosts/{late}") is None


async def test_conflicting_user_is_refused(kube, env, vhost):
    ns = env["ns"]
    spec = {
        "serverRef": {"name": "rabbit"},
        "vhost": vhost,
        "user": {"name": "notifications"},
        "queues": [{"name": "thief.q"}],
    }
    kube.create(ns, TOPO, "thief", spec)
    obj = await kube.wait_reason(ns, TOPO, "thief", "Conflict")
    assert kube.condition(obj, "Conflict")["status"] == "True"
    assert "notifications" in kube.condition(obj)["message"]
    assert await kube.wait_ready(ns, TOPO, "notifications")  # the first claimant is untouched
    kube.delete(ns, TOPO, "thief")
    await kube.wait_gone(ns, TOPO, "thief")
    assert kube.secret(ns, "notifications-amqp")  # deleting the loser did not touch the winner's user
    await kube.wait_ready(ns, TOPO, "notifications")


async def test_delete_blocked_by_non_empty_queue(kube, env, vhost, rabbitmq):
    ns = env["ns"]
    orders = kube.secret(ns, "orders-amqp")
    conn = await aio_pika.connect(orders["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        exchange = await channel.get_exchange("emporium.events", ensure=False)
        await exchange.publish(aio_pika.Message(b"pending"), routing_key="user.registered")
    await kube.wait_for(
        lambda: (api_get(rabbitmq, f"/api/queues/{vhost}/orders.events") or {}).get("messages", 0) >= 1,
        what="message queued",
    )
    kube.delete(ns, TOPO, "orders")
    obj = await kube.wait_reason(ns, TOPO, "orders", "QueuesNotEmpty", type_="DeletionBlocked")
    assert "orders.events" in kube.condition(obj, "DeletionBlocked")["message"]
    rabbitmq.api("DELETE", f"/api/queues/{vhost}/orders.events/contents")
    await kube.wait_gone(ns, TOPO, "orders", within=30)
    assert api_get(rabbitmq, f"/api/queues/{vhost}/orders.events") is None
    assert api_get(rabbitmq, "/api/users/orders") is None
    # emporium.events is still declared by notifications, so it stays.
    assert api_get(rabbitmq, f"/api/exchanges/{vhost}/emporium.events") is not None


async def test_service_topology_files_from_the_charts_apply(kube, env, vhost, rabbitmq):
    """The topology files the service charts ship (charts/<svc>/files/rabbit-topology.yaml) are valid."""
    ns = env["ns"]
    assert CHART_TOPOLOGIES
    for svc, spec in CHART_TOPOLOGIES.items():
        spec = {**spec, "serverRef": {"name": "rabbit"}, "vhost": vhost, "secretName": f"chart-{svc}-amqp"}
        spec["user"] = {**spec["user"], "name": f"chart-{svc}"}  # the plain service names are taken above
        kube.create(ns, TOPO, f"chart-{svc}", spec)
    for svc in CHART_TOPOLOGIES:
        await kube.wait_ready(ns, TOPO, f"chart-{svc}")
        perms = rabbitmq.api("GET", f"/api/permissions/{vhost}/chart-{svc}")
        assert perms["configure"] == "^$"
