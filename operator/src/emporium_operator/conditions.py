"""Status conditions (Kubernetes-style) as pure functions over plain lists of dicts."""

from __future__ import annotations

import datetime as dt
from typing import Any


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None = None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Return a new list with the condition set; lastTransitionTime moves only when the status flips."""
    status_str = status if isinstance(status, str) else ("True" if status else "False")
    result = [dict(c) for c in (conditions or []) if c.get("type") != type_]
    previous = next((c for c in (conditions or []) if c.get("type") == type_), None)
    transition = now or now_iso()
    if previous is not None and previous.get("status") == status_str:
        transition = previous.get("lastTransitionTime") or transition
    condition: dict[str, Any] = {
        "type": type_,
        "status": status_str,
        "reason": reason,
        "message": message[:1000],
        "lastTransitionTime": transition,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    result.append(condition)
    return sorted(result, key=lambda c: (c["type"] != "Ready", c["type"]))


def remove_condition(conditions: list[dict[str, Any]] | None, type_: str) -> list[dict[str, Any]]:
    return [dict(c) for c in (conditions or []) if c.get("type") != type_]


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in (conditions or []) if c.get("type") == type_), None)


def is_ready(status: dict[str, Any] | None) -> bool:
    condition = get_condition((status or {}).get("conditions"), "Ready")
    return bool(condition and condition.get("status") == "True")
