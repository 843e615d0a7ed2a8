"""RabbitVhost: a vhost the operator creates and marks (its description) as owned by this object."""

from __future__ import annotations

from typing import Any

import httpx
import kopf

from . import events, rabbit, rabbit_server
from .common import (
    NotReady,
    Outcome,
    Refused,
    blocked,
    claim,
    claim_winner,
    count_drift,
    force_delete,
    server_key,
)
from .engine import ENGINE, locked_delete, reclaims

KIND, PLURAL = "RabbitVhost", "rabbitvhosts"


def vhost_name(body: dict[str, Any]) -> str:
    return body["spec"].get("name") or body["metadata"]["name"]


def key_for(server: dict[str, Any], vhost: str) -> tuple:
    """The dependency key topologies wait on: the vhost on that broker."""
    return ("vhost", rabbit_server.endpoint(server), vhost)


def _endpoint_of(key: tuple[str, str] | None) -> str | None:
    return rabbit_server.endpoint(ENGINE.get(rabbit_server.PLURAL, *key)) if key else None


def conflict(body: dict[str, Any]) -> str | None:
    vhost = vhost_name(body)
    claims = [claim(o, server_key(o)) for o in ENGINE.objects(PLURAL) if vhost_name(o) == vhost]
    winner = claim_winner(claims, body["metadata"]["namespace"], body["metadata"]["name"], _endpoint_of)
    return f"vhost {vhost!r} is already claimed by {KIND} {winner!r}" if winner else None


def users_of(body: dict[str, Any], server: dict[str, Any]) -> list[str]:
    """RabbitTopology objects (any namespace) declared in this vhost on the same broker."""
    vhost, mine = vhost_name(body), rabbit_server.endpoint(server)
    found = []
    for topo in ENGINE.objects("rabbittopologies"):
        if topo["spec"].get("vhost") == vhost and _endpoint_of(server_key(topo)) == mine:
            found.append(f"{topo['metadata']['namespace']}/{topo['metadata']['name']}")
    return sorted(found)


async def reconcile(body: dict[str, Any], out: Outcome) -> str:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    vhost = vhost_name(body)
    problem = conflict(body)
    if problem:
        raise Refused("Conflict", problem)
    server = await rabbit_server.server_for(body)
    api, admin_user = await rabbit_server.api_for(server)
    description = rabbit.vhost_description(f"{namespace}/{name}")
    repairs = []
    async with api.limit:
        try:
            have = await api.get_vhost(vhost)
            if have is not None and have.get("description") != description:
                raise Refused(
                    "Forbidden",
                    f"vhost {vhost!r} exists and was not created by the operator for this object; "
                    "nothing was changed",
                )
            if have is None:
                await api.put_vhost(vhost, description)
                repairs.append("vhost")
            perms = await api.get_permissions(vhost, admin_user)
            if not perms or perms.get("configure") != ".*":
                await api.put_permissions(vhost, admin_user, {"configure": ".*", "write": ".*", "read": ".*"})
        except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
            raise rabbit_server.error(e, server["spec"]["managementUrl"], rabbit_server.key_of(server)) from e
    count_drift(KIND, body, repairs, out)
    out.status["vhost"] = vhost
    out.reason = "Provisioned"
    out.provides = key_for(server, vhost)
    return f"vhost {vhost!r} present"


async def _delete(body: dict[str, Any], patch: kopf.Patch, logger: Any) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    vhost = vhost_name(body)
    if not needs_cleanup(body["spec"]) or conflict(body):
        return
    if force_delete(body):
        logger.warning("force-delete annotation: releasing without deleting the vhost")
        return
    try:
        server = await rabbit_server.server_for(body)
        api, _admin = await rabbit_server.api_for(server)
    except NotReady as e:
        logger.warning(f"{e.message}: releasing without deleting the vhost")
        return
    users = users_of(body, server)
    if users:
        raise blocked(
            body,
            patch,
            "VhostInUse",
            f"vhost {vhost!r} is still used by RabbitTopology {', '.join(users[:5])}; delete them first "
            "(or set reclaimPolicy: Retain)",
        )
    async with api.limit:
        try:
            have = await api.get_vhost(vhost)
            if have and have.get("description") != rabbit.vhost_description(f"{namespace}/{name}"):
                events.warn(body, reason="Forbidden", message=f"vhost {vhost!r} is not ours: released, kept")
                return
            queues = await api.list_queues(vhost) if have else []
            busy = [x["name"] for x in queues if x.get("messages")]
            if busy:
                raise blocked(
                    body,
                    patch,
                    "QueuesNotEmpty",
                    f"vhost {vhost!r} has non-empty queues {busy[:5]}; drain them or set Retain",
                )
            if have:
                await api.delete_vhost(vhost)
        except (rabbit.RabbitError, httpx.HTTPError, OSError) as e:
            err = rabbit_server.error(e, server["spec"]["managementUrl"])
            raise blocked(body, patch, err.reason, err.message) from e


needs_cleanup = reclaims
delete = locked_delete(PLURAL, _delete)
