"""RabbitTopology: one service's broker user and permissions, exchanges, queues (with policies), bindings,
and the connection Secret."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import kopf

from . import events, rabbit, rabbit_server, rabbit_vhost, trace
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
from .secrets import amqp_uri, generate_password, parse_duration

KIND, PLURAL = "RabbitTopology", "rabbittopologies"


def user_name(body: dict[str, Any]) -> str:
    return (body["spec"].get("user") or {}).get("name") or body["metadata"]["name"]


def owner_tag(body: dict[str, Any]) -> str:
    return rabbit.owner_tag(f"{body['metadata']['namespace']}/{body['metadata']['name']}")


def _endpoint_of(key: tuple[str, str] | None) -> str | None:
    return rabbit_server.endpoint(ENGINE.get(rabbit_server.PLURAL, *key)) if key else None


def conflict(body: dict[str, Any]) -> str | None:
    user = user_name(body)
    claims = [claim(o, server_key(o)) for o in ENGINE.objects(PLURAL) if user_name(o) == user]
    winner = claim_winner(claims, body["metadata"]["namespace"], body["metadata"]["name"], _endpoint_of)
    return f"broker user {user!r} is already claimed by {KIND} {winner!r}" if winner else None


def _exchanges_of(body: dict[str, Any]) -> list[str]:
    names = [e.get("name") for e in body["spec"].get("exchanges") or []]
    if body["spec"].get("deadLetter"):
        names.append(body["spec"]["deadLetter"].get("exchange"))
    return names


def shared_exchanges(body: dict[str, Any]) -> frozenset[str]:
    """Exchanges that other topologies in the same vhost on the same broker declare too (never pruned)."""
    mine = _endpoint_of(server_key(body))
    shared: set[str] = set()
    for other in ENGINE.objects(PLURAL):
        if other["metadata"]["uid"] == body["metadata"]["uid"]:
            continue
        if other["spec"].get("vhost") == body["spec"]["vhost"] and _endpoint_of(server_key(other)) == mine:
            shared.update(_exchanges_of(other))
    return frozenset(shared)


def binding_data(user: str, password: str, server: dict[str, Any], vhost: str) -> dict[str, str]:
    spec = server["spec"]
    host, port = spec["amqpHost"], int(spec.get("amqpPort", 5672))
    uri = amqp_uri(user, password, host, port, vhost, bool(spec.get("amqpTls")))
    return {
        # Emporium's keys
        "uri": uri,
        "AMQP_URL": uri,
        "host": host,
        "port": str(port),
        "vhost": vhost,
        "username": user,
        "password": password,
        # servicebinding.io
        "type": "rabbitmq",
        "provider": "emporium-operator",
        "virtual-host": vhost,
    }


def _broker_error(e: BaseException, server: dict[str, Any]) -> Exception:
    if isinstance(e, rabbit.RabbitError) and e.status == 400:
        return Refused("InvalidSpec", f"the broker rejected the topology: {e}")
    return rabbit_server.error(e, server["spec"]["managementUrl"], rabbit_server.key_of(server))


async def reconcile(body: dict[str, Any], out: Outcome) -> str:
    spec = dict(body["spec"])
    name = body["metadata"]["name"]
    status = dict(body.get("status") or {})
    try:
        parse_duration((spec.get("passwordRotation") or {}).get("interval"))
    except ValueError as e:
        raise Refused("InvalidSpec", str(e)) from e
    problem = conflict(body)
    if problem:
        raise Refused("Conflict", problem)
    secret_name = spec.get("secretName") or f"{name}-amqp"
    server = await rabbit_server.server_for(body)
    # The object's own Secret is read while the admin credentials are looked up and the broker is observed;
    # a new one is written while the broker declares, an existing one after it (CredentialsSecret).
    async with CredentialsSecret(body, secret_name) as secret:
        with trace.span("admin-secret"):
            api, admin_user = await rabbit_server.api_for(server)
        with trace.span("rabbit.limit"):
            await api.limit.acquire()
        try:
            try:
                observed = await rabbit.observe_topology(api, spec["vhost"], user_name(body))  # 4 at once
            except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
                raise _broker_error(e, server) from e
            with trace.span("secret.read"):
                current = await secret.read()
            existing = secret_password(current)
            now = dt.datetime.now(dt.UTC)
            rotate, trigger = rotation_due(spec, status, now)
            rotated = bool(existing and rotate)
            password = generate_password() if rotated or not existing else existing
            want = rabbit.desired_topology(spec, name, password, owner_tag(body))
            for x in want.queues:
                if x["type"] == "quorum" and not x["durable"]:
                    raise Refused("InvalidSpec", f"quorum queue {x['name']!r} must be durable")
            have_vhost = observed.vhost
            if have_vhost is None:
                raise NotReady(
                    "VhostMissing",
                    f"vhost {want.vhost!r} does not exist on RabbitServer {server['metadata']['name']!r}; "
                    "create a RabbitVhost for it",
                    rabbit_vhost.key_for(server, want.vhost),
                )
            if not str(have_vhost.get("description") or "").startswith(rabbit.VHOST_MARK):
                raise Refused(
                    "Forbidden",
                    f"vhost {want.vhost!r} was not created by the operator (no RabbitVhost); "
                    "nothing was changed",
                )
            try:
                declare, result = rabbit.plan_topology(
                    want, observed, admin_user, known_password=bool(existing) and not rotated
                )
            except rabbit.Forbidden as e:
                raise Refused("Forbidden", f"{e}; nothing was changed") from e
            secret.prepare(binding_data(want.user, password, server, want.vhost))
            try:
                await rabbit.apply_topology(
                    api,
                    want,
                    observed,
                    declare,
                    result,
                    status.get("applied") or {},
                    spec.get("reclaimPolicy", "Retain") == "Delete",
                    shared_exchanges(body),
                )
            except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
                raise _broker_error(e, server) from e
        finally:
            api.limit.release()
    await secret.save()
    objects = [o for o in result.repairs if not (rotated and o == "password")]
    count_drift(KIND, body, objects, out)
    applied = rabbit.applied_record(want)
    applied["queues"] = sorted(set(applied["queues"]) | set(result.retained))
    out.status.update(
        {
            "applied": applied,
            "retainedQueues": result.retained,
            "vhost": want.vhost,
            "username": want.user,
            "secretName": secret_name,
            "exchanges": len(want.exchanges),
            "queues": len(want.queues),
            "bindings": len(want.bindings),
        }
    )
    if trigger:
        out.status["rotationTrigger"] = trigger
    if rotated or not status.get("passwordRotatedAt") or not existing:
        out.status["passwordRotatedAt"] = now_iso()
    if result.mismatches:
        raise Refused("TypeMismatch", "; ".join(result.mismatches))
    out.reason = "Provisioned"
    message = (
        f"{len(want.exchanges)} exchanges, {len(want.queues)} queues, {len(want.bindings)} bindings "
        f"in vhost {want.vhost!r}; credentials in Secret {secret_name!r}"
    )
    if result.retained:
        message += f"; retained queues no longer in spec: {result.retained}"
    return message


async def _delete(body: dict[str, Any], patch: kopf.Patch, logger: Any) -> None:
    spec = body["spec"]
    if not needs_cleanup(spec) or conflict(body):
        return
    if force_delete(body):
        logger.warning("force-delete annotation: releasing without touching the broker")
        return
    try:
        server = await rabbit_server.server_for(body)
        api, _admin = await rabbit_server.api_for(server)
    except NotReady as e:
        logger.warning(f"{e.message}: releasing without touching the broker")
        return
    vhost = spec["vhost"]
    applied = (body.get("status") or {}).get("applied") or {}
    user = user_name(body)
    async with api.limit:
        try:
            have_user = await api.get_user(user)
            ours = have_user is not None and rabbit.user_tags(have_user) == [owner_tag(body)]
            if have_user is not None and not ours:
                events.warn(body, reason="Forbidden", message=f"user {user!r} is not ours: released, kept")
                return
            vhost_info = await api.get_vhost(vhost)
            if vhost_info is not None and str(vhost_info.get("description") or "").startswith(
                rabbit.VHOST_MARK
            ):
                queues = {x["name"]: x for x in await api.list_queues(vhost)}
                mine = [n for n in applied.get("queues", []) if n in queues]
                busy = [n for n in mine if queues[n].get("messages")]
                if busy:
                    raise blocked(
                        body,
                        patch,
                        "QueuesNotEmpty",
                        f"queues {busy} still hold messages; drain them, or set reclaimPolicy: Retain",
                    )
                bindings = {
                    rabbit.observed_binding_key(b): b for b in await api.list_bindings(vhost) if b["source"]
                }
                for b in applied.get("bindings", []):
                    found = bindings.get(rabbit.binding_key(b))
                    if found:
                        await api.delete_binding(vhost, b, found["properties_key"])
                for policy in applied.get("policies", []):
                    await api.delete_policy(vhost, policy)
                for queue in mine:
                    await api.delete_queue(vhost, queue)
                shared = shared_exchanges(body)
                for exchange in applied.get("exchanges", []):
                    if exchange not in shared:
                        await api.delete_exchange(vhost, exchange)
            if ours:
                await api.delete_user(user)
        except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
            err = rabbit_server.error(e, server["spec"]["managementUrl"])
            raise blocked(body, patch, err.reason, err.message) from e


needs_cleanup = reclaims
delete = locked_delete(PLURAL, _delete)
