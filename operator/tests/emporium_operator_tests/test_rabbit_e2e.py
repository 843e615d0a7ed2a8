"""RabbitServer, RabbitVhost and RabbitTopology through the real operator, API server and RabbitMQ.
Each test makes its own topologies (unique names); the vhost is a module fixture."""

from __future__ import annotations

import asyncio
import urllib.error
from pathlib import Path

import aio_pika
import httpx
import pytest
import yaml
from aiormq.exceptions import ChannelAccessRefused
from kubernetes.client.rest import ApiException

TOPO = "RabbitTopology"
CHART_TOPOLOGIES = {
    path.parent.parent.name: yaml.safe_load(path.read_text())
    for path in sorted((Path(__file__).resolve().parents[3] / "charts").glob("*/files/rabbit-topology.yaml"))
}


def orders_spec(vhost: str, svc: str, exchange: str = "emporium.events") -> dict:
    return {
        "serverRef": {"name": "rabbit"},
        "vhost": vhost,
        "reclaimPolicy": "Delete",
        "exchanges": [{"name": exchange, "type": "topic"}],
        "queues": [
            {"name": f"{svc}.events", "type": "quorum", "messageTtl": 60000, "deliveryLimit": 5},
            {"name": f"{svc}.audit", "type": "classic"},
        ],
        "bindings": [
            {"source": exchange, "destination": f"{svc}.events", "routingKey": "user.#"},
            {"source": exchange, "destination": f"{svc}.audit", "routingKey": "#"},
        ],
    }


def notifications_spec(vhost: str, svc: str, exchange: str = "emporium.events") -> dict:
    return {
        "serverRef": {"name": "rabbit"},
        "vhost": vhost,
        "exchanges": [{"name": exchange, "type": "topic"}],
        "queues": [
            {
                "name": f"{svc}.events",
                "deadLetter": {"exchange": f"{svc}.dlx", "routingKey": f"{svc}.events"},
            },
        ],
        "deadLetter": {"exchange": f"{svc}.dlx", "queue": f"{svc}.dlq"},
        "bindings": [{"source": exchange, "destination": f"{svc}.events", "routingKey": "order.#"}],
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


@pytest.fixture
def make_topo(kube, env):
    async def make(spec_of, prefix: str = "svc", wait: bool = True) -> tuple[str, dict | None]:
        name = kube.unique(prefix)
        kube.create(env["ns"], TOPO, name, spec_of(name))
        return name, (await kube.wait_ready(env["ns"], TOPO, name) if wait else None)

    return make


async def test_server_and_vhost_ready(kube, env, vhost, rabbitmq):
    obj = await kube.wait_ready(env["ns"], "RabbitServer", "rabbit")
    assert obj["status"]["version"]
    assert api_get(rabbitmq, f"/api/vhosts/{vhost}") is not None


async def test_topology_secret_works_with_least_privilege(kube, env, vhost, rabbitmq, make_topo):
    ns = env["ns"]
    orders, _ = await make_topo(lambda n: orders_spec(vhost, n), "orders")
    notif, obj = await make_topo(lambda n: notifications_spec(vhost, n), "notif")
    assert obj["status"]["queues"] == 2
    secret = kube.secret(ns, f"{notif}-amqp")
    assert {"uri", "AMQP_URL", "host", "port", "vhost", "username", "password"} <= set(secret)
    assert secret["type"] == "rabbitmq" and secret["provider"] == "emporium-operator"
    assert secret["vhost"] == secret["virtual-host"] == vhost and secret["username"] == notif
    annotations = kube.core.read_namespaced_secret(f"{notif}-amqp", ns).metadata.annotations
    assert annotations["emporium.dev/credentials-hash"]
    policy = api_get(rabbitmq, f"/api/policies/{vhost}/emporium-queue.{orders}.events")
    assert policy["definition"] == {"message-ttl": 60000, "delivery-limit": 5}
    dl = api_get(rabbitmq, f"/api/policies/{vhost}/emporium-queue.{notif}.events")
    assert dl["definition"]["dead-letter-exchange"] == f"{notif}.dlx"

    conn = await aio_pika.connect(kube.secret(ns, f"{orders}-amqp")["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        exchange = await channel.get_exchange("emporium.events", ensure=False)
        await exchange.publish(aio_pika.Message(b'{"x": 1}'), routing_key="order.created")
    conn = await aio_pika.connect(secret["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        queue = await channel.get_queue(f"{notif}.events", ensure=False)
        message = None
        for _ in range(20):
            message = await queue.get(timeout=5, fail=False)
            if message:
                break
            await asyncio.sleep(0.25)
        assert message and message.body == b'{"x": 1}'
        await message.ack()
    # notif may not read the orders service's queue, nor declare anything.
    conn = await aio_pika.connect(secret["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        with pytest.raises(ChannelAccessRefused):
            queue = await channel.get_queue(f"{orders}.audit", ensure=False)
            await queue.get(timeout=5, fail=False)
    conn = await aio_pika.connect(secret["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        with pytest.raises(ChannelAccessRefused):
            await channel.declare_queue("rogue", durable=True)


async def test_update_prunes_and_changes_policy(kube, env, vhost, rabbitmq, make_topo):
    ns = env["ns"]
    name, _ = await make_topo(lambda n: orders_spec(vhost, n, f"{n}.x"), "prune")
    rabbitmq.api(
        "POST",
        f"/api/exchanges/{vhost}/{name}.x/publish",
        {"properties": {}, "routing_key": "any", "payload": "kept", "payload_encoding": "string"},
    )
    await kube.wait_for(
        lambda: (api_get(rabbitmq, f"/api/queues/{vhost}/{name}.audit") or {}).get("messages", 0) >= 1,
        what="message queued",
    )
    spec = orders_spec(vhost, name, f"{name}.x")
    spec["queues"] = [{"name": f"{name}.events", "type": "quorum", "messageTtl": 600000}]
    spec["bindings"] = spec["bindings"][:1]
    kube.custom.replace_namespaced_custom_object(
        "emporium.dev", "v1alpha1", ns, "rabbittopologies", name, {**kube.get(ns, TOPO, name), "spec": spec}
    )
    await kube.wait_for(
        lambda: (
            (api_get(rabbitmq, f"/api/policies/{vhost}/emporium-queue.{name}.events") or {}).get("definition")
            == {"message-ttl": 600000}
        ),
        within=10,
        what="policy changed",
    )
    obj = await kube.wait_ready(ns, TOPO, name)
    # .audit still holds the message: kept and reported; once empty, the drift check prunes it.
    assert obj["status"]["retainedQueues"] == [f"{name}.audit"]
    assert f"{name}.audit" in kube.condition(obj)["message"]
    rabbitmq.api("DELETE", f"/api/queues/{vhost}/{name}.audit/contents")
    await kube.wait_for(
        lambda: api_get(rabbitmq, f"/api/queues/{vhost}/{name}.audit") is None, within=30, what="pruned"
    )
    bindings = rabbitmq.api("GET", f"/api/bindings/{vhost}")
    assert not [b for b in bindings if b["destination"] == f"{name}.audit"]


async def test_drift_repair_queue_binding_user_and_permission(kube, env, vhost, rabbitmq, make_topo):
    ns = env["ns"]
    name, _ = await make_topo(lambda n: notifications_spec(vhost, n), "drift")
    rabbitmq.api("DELETE", f"/api/queues/{vhost}/{name}.events")
    rabbitmq.api("DELETE", f"/api/permissions/{vhost}/{name}")
    for b in rabbitmq.api("GET", f"/api/bindings/{vhost}/e/{name}.dlx/q/{name}.dlq"):
        rabbitmq.api("DELETE", f"/api/bindings/{vhost}/e/{name}.dlx/q/{name}.dlq/{b['properties_key']}")

    def repaired():
        return (
            api_get(rabbitmq, f"/api/queues/{vhost}/{name}.events")
            and rabbitmq.api("GET", f"/api/bindings/{vhost}/e/{name}.dlx/q/{name}.dlq")
            and api_get(rabbitmq, f"/api/permissions/{vhost}/{name}")
            and rabbitmq.api("GET", f"/api/bindings/{vhost}/e/emporium.events/q/{name}.events")
        )

    await kube.wait_for(repaired, within=30, what="queue, bindings and permission recreated")
    obj = await kube.wait_for(
        lambda: (o := kube.get(ns, TOPO, name))["status"].get("driftRepairs", 0) >= 3 and o, within=30
    )
    assert obj["status"]["lastDriftRepair"]["objects"]
    assert kube.events(ns, name, "DriftRepaired", "Normal")
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{env['metrics_port']}/metrics")).text
    for obj_label in ("queue", "binding", "permission"):
        assert f'emporium_operator_drift_repairs_total{{kind="RabbitTopology",object="{obj_label}"}}' in text
    # A password changed on the broker is reset to the Secret's (the ownership tag kept, as an admin would).
    tags = rabbitmq.api("GET", f"/api/users/{name}")["tags"]
    rabbitmq.api("PUT", f"/api/users/{name}", {"password": "tampered", "tags": ",".join(tags)})
    secret = kube.secret(ns, f"{name}-amqp")
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


async def test_type_mismatch_and_immutable_queue_types(kube, env, vhost, rabbitmq):
    ns = env["ns"]
    name = kube.unique("mismatch")
    rabbitmq.api(
        "PUT", f"/api/queues/{vhost}/{name}.q", {"durable": True, "arguments": {"x-queue-type": "classic"}}
    )
    kube.create(
        ns, TOPO, name, {"serverRef": {"name": "rabbit"}, "vhost": vhost, "queues": [{"name": f"{name}.q"}]}
    )
    obj = await kube.wait_reason(ns, TOPO, name, "TypeMismatch")
    assert "classic" in kube.condition(obj)["message"] and "quorum" in kube.condition(obj)["message"]
    assert kube.secret(ns, f"{name}-amqp")  # the rest is applied: the service can still connect
    with pytest.raises(ApiException) as info:
        kube.patch_spec(ns, TOPO, name, {"queues": [{"name": f"{name}.q", "type": "classic"}]})
    assert info.value.status == 422 and "type is immutable" in info.value.body
    # Deleting the queue on the broker lets the operator declare it as the spec says.
    rabbitmq.api("DELETE", f"/api/queues/{vhost}/{name}.q")
    await kube.wait_ready(ns, TOPO, name, within=30)
    assert rabbitmq.api("GET", f"/api/queues/{vhost}/{name}.q")["type"] == "quorum"


async def test_rotation_and_retain_keeps_the_user(kube, env, vhost, rabbitmq, make_topo):
    ns = env["ns"]
    name, _ = await make_topo(
        lambda n: {"serverRef": {"name": "rabbit"}, "vhost": vhost, "queues": [{"name": f"{n}.q"}]}, "rot"
    )
    old = kube.secret(ns, f"{name}-amqp")
    kube.patch_spec(ns, TOPO, name, {"passwordRotation": {"trigger": "now"}})
    new = await kube.wait_for(
        lambda: (s := kube.secret(ns, f"{name}-amqp"))["password"] != old["password"] and s, within=30
    )
    conn = await aio_pika.connect(new["uri"], timeout=10)
    await conn.close()
    with pytest.raises(Exception):  # noqa: B017 - aio_pika's authentication error
        await aio_pika.connect(old["uri"], timeout=10)
    kube.delete(ns, TOPO, name)  # Retain (default): queues and the broker user stay
    await kube.wait_gone(ns, TOPO, name)
    assert api_get(rabbitmq, f"/api/users/{name}") is not None
    assert api_get(rabbitmq, f"/api/queues/{vhost}/{name}.q") is not None


async def test_vhost_missing_then_created_wakes_the_topology(kube, env, rabbitmq):
    ns = env["ns"]
    name = kube.unique("late")
    late = f"{name}-{ns}"
    kube.create(
        ns,
        TOPO,
        name,
        {
            "serverRef": {"name": "rabbit"},
            "vhost": late,
            "reclaimPolicy": "Delete",
            "queues": [{"name": "late.q"}],
        },
    )
    obj = await kube.wait_reason(ns, TOPO, name, "VhostMissing")
    assert late in kube.condition(obj)["message"]
    kube.create(
        ns, "RabbitVhost", name, {"serverRef": {"name": "rabbit"}, "name": late, "reclaimPolicy": "Delete"}
    )
    # Woken when the vhost is Ready (the benchmark measures how soon; here the retries are short anyway).
    await kube.wait_ready(ns, TOPO, name, within=10)
    assert api_get(rabbitmq, f"/api/queues/{late}/late.q")
    # Deleting the vhost while the topology uses it is blocked with a condition.
    kube.delete(ns, "RabbitVhost", name)
    obj = await kube.wait_reason(ns, "RabbitVhost", name, "VhostInUse", type_="DeletionBlocked")
    assert name in kube.condition(obj, "DeletionBlocked")["message"]
    assert api_get(rabbitmq, f"/api/vhosts/{late}") is not None
    kube.delete(ns, TOPO, name)
    await kube.wait_gone(ns, TOPO, name)
    await kube.wait_gone(ns, "RabbitVhost", name, within=30)
    assert api_get(rabbitmq, f"/api/vhosts/{late}") is None


async def test_conflicting_user_is_refused(kube, env, vhost, make_topo):
    ns = env["ns"]
    first, _ = await make_topo(lambda n: notifications_spec(vhost, n), "first")
    thief = kube.unique("thief")
    spec = {
        "serverRef": {"name": "rabbit"},
        "vhost": vhost,
        "user": {"name": first},
        "queues": [{"name": f"{thief}.q"}],
    }
    kube.create(ns, TOPO, thief, spec)
    obj = await kube.wait_reason(ns, TOPO, thief, "Conflict")
    assert kube.condition(obj, "Conflict")["status"] == "True"
    assert first in kube.condition(obj)["message"]
    kube.delete(ns, TOPO, thief)
    await kube.wait_gone(ns, TOPO, thief)
    assert kube.secret(ns, f"{first}-amqp")  # deleting the loser did not touch the winner's user
    await kube.wait_ready(ns, TOPO, first)


async def test_delete_blocked_by_non_empty_queue(kube, env, vhost, rabbitmq, make_topo):
    ns = env["ns"]
    keeper, _ = await make_topo(lambda n: notifications_spec(vhost, n, "shared.x"), "keeper")
    name, _ = await make_topo(lambda n: orders_spec(vhost, n, "shared.x"), "busy")
    conn = await aio_pika.connect(kube.secret(ns, f"{name}-amqp")["uri"], timeout=10)
    async with conn:
        channel = await conn.channel()
        exchange = await channel.get_exchange("shared.x", ensure=False)
        await exchange.publish(aio_pika.Message(b"pending"), routing_key="user.registered")
    await kube.wait_for(
        lambda: (api_get(rabbitmq, f"/api/queues/{vhost}/{name}.events") or {}).get("messages", 0) >= 1,
        what="message queued",
    )
    kube.delete(ns, TOPO, name)
    obj = await kube.wait_reason(ns, TOPO, name, "QueuesNotEmpty", type_="DeletionBlocked")
    assert f"{name}.events" in kube.condition(obj, "DeletionBlocked")["message"]
    rabbitmq.api("DELETE", f"/api/queues/{vhost}/{name}.events/contents")
    rabbitmq.api("DELETE", f"/api/queues/{vhost}/{name}.audit/contents")
    await kube.wait_gone(ns, TOPO, name, within=30)
    assert api_get(rabbitmq, f"/api/queues/{vhost}/{name}.events") is None
    assert api_get(rabbitmq, f"/api/users/{name}") is None  # reclaimPolicy Delete: the user goes too
    # shared.x is still declared by the keeper, so it stays.
    assert api_get(rabbitmq, f"/api/exchanges/{vhost}/shared.x") is not None
    assert keeper


async def test_service_topology_files_from_the_charts_apply(kube, env, vhost, rabbitmq):
    """The topology files the service charts ship (charts/<svc>/files/rabbit-topology.yaml) are valid."""
    ns = env["ns"]
    assert CHART_TOPOLOGIES
    for svc, spec in CHART_TOPOLOGIES.items():
        spec = {**spec, "serverRef": {"name": "rabbit"}, "vhost": vhost, "secretName": f"chart-{svc}-amqp"}
        spec["user"] = {**spec["user"], "name": f"chart-{svc}"}
        kube.create(ns, TOPO, f"chart-{svc}", spec)
    for svc in CHART_TOPOLOGIES:
        await kube.wait_ready(ns, TOPO, f"chart-{svc}")
        perms = rabbitmq.api("GET", f"/api/permissions/{vhost}/chart-{svc}")
        assert perms["configure"] == "^$"
