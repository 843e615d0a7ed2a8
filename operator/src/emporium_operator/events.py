"""Kubernetes Events about our objects, posted through the API (from any task, not only Kopf's handlers)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from typing import Any

import httpx

from .kube import KUBE

log = logging.getLogger("emporium_operator.events")
_pending: set[asyncio.Task] = set()


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _post(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    meta = body["metadata"]
    namespace = meta["namespace"]
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "name": meta["name"],
            "namespace": namespace,
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": "emporium-operator"},
        "firstTimestamp": _now(),
        "lastTimestamp": _now(),
        "count": 1,
        "reportingComponent": "emporium-operator",
    }
    try:
        response = await KUBE.client.post(f"/api/v1/namespaces/{namespace}/events", json=event)
        response.raise_for_status()
    except (httpx.HTTPError, RuntimeError) as e:
        log.warning("event %s on %s/%s not posted: %s", reason, namespace, meta["name"], e)


def post(body: Any, type_: str, reason: str, message: str) -> None:
    """Post in the background: a slow API server never delays a reconcile."""
    task = asyncio.get_running_loop().create_task(_post(dict(body), type_, reason, message))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def warn(body: Any, reason: str, message: str) -> None:
    post(body, "Warning", reason, message)


def info(body: Any, reason: str, message: str) -> None:
    post(body, "Normal", reason, message)
