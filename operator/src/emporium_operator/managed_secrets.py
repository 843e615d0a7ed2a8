"""The operator's Secrets: an edit or a deletion out of band reconciles the owner at once."""

from __future__ import annotations

from typing import Any

from .common import OWN_WRITES
from .engine import ENGINE

PLURALS = {"PostgresDatabase": "postgresdatabases", "RabbitTopology": "rabbittopologies"}


async def changed(type: str | None, body: Any, namespace: str, **_: Any) -> None:
    if type not in ("DELETED", "MODIFIED"):
        return
    meta = body["metadata"]
    if type == "MODIFIED" and OWN_WRITES.get((namespace, meta["name"])) == meta.get("resourceVersion"):
        return  # the operator's own write
    labels = meta.get("labels") or {}
    plural = PLURALS.get(labels.get("emporium.dev/owner-kind", ""))
    owner = labels.get("emporium.dev/owner-name")
    if plural and owner:
        ENGINE.nudge((plural, namespace, owner))
