"""Connection Secrets: URIs (percent-encoded), passwords, the Secret body with owner reference and label."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets as _random
from typing import Any
from urllib.parse import quote

MANAGED_LABEL = "emporium.dev/managed"
MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR_NAME = "emporium-operator"

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def generate_password(length: int = 32) -> str:
    """URL-safe random password (no characters that need quoting in most tools)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(_random.choice(alphabet) for _ in range(length))


def parse_duration(text: str | None) -> float | None:
    """'720h', '30d', '1h30m', '45s' -> seconds; None/'' -> None; ValueError when malformed."""
    if not text:
        return None
    match = _DURATION.match(text.strip())
    if not match or not any(match.groups()):
        raise ValueError(f"invalid duration {text!r}: use e.g. 30d, 720h, 90m or 45s")
    d, h, m, s = (int(g or 0) for g in match.groups())
    return float(((d * 24 + h) * 60 + m) * 60 + s)


def postgres_uri(
    user: str, password: str, host: str, port: int, dbname: str, sslmode: str | None = None
) -> str:
    uri = (
        f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{_host(host)}:{port}/"
        f"{quote(dbname, safe='')}"
    )
    if sslmode and sslmode not in ("prefer", "disable"):
        uri += f"?sslmode={quote(sslmode, safe='')}"
    return uri


def amqp_uri(user: str, password: str, host: str, port: int, vhost: str, tls: bool = False) -> str:
    scheme = "amqps" if tls else "amqp"
    return (
        f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{_host(host)}:{port}/"
        f"{quote(vhost, safe='')}"
    )


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def owner_reference(body: Any) -> dict[str, Any]:
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": False,
    }


def jdbc_uri(user: str, password: str, host: str, port: int, dbname: str, sslmode: str | None = None) -> str:
    """CloudNativePG's form: credentials as query parameters."""
    uri = (
        f"jdbc:postgresql://{_host(host)}:{port}/{quote(dbname, safe='')}"
        f"?user={quote(user, safe='')}&password={quote(password, safe='')}"
    )
    if sslmode and sslmode not in ("prefer", "disable"):
        uri += f"&sslmode={quote(sslmode, safe='')}"
    return uri


def pgpass(user: str, password: str, host: str, port: int, dbname: str) -> str:
    """One ~/.pgpass line (':' and '\\' escaped)."""

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return f"{esc(host)}:{port}:{esc(dbname)}:{esc(user)}:{esc(password)}\n"


def credentials_hash(data: dict[str, str]) -> str:
    """A stable digest of a Secret's data: workloads put it in a pod annotation to roll on a change."""
    digest = hashlib.sha256()
    for key in sorted(data):
        digest.update(key.encode() + b"\x00" + data[key].encode() + b"\x00")
    return digest.hexdigest()[:32]


def secret_manifest(
    name: str, namespace: str, owner: Any, data: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """A v1 Secret (type Opaque) with the managed label and an owner reference to the custom resource."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": dict(annotations or {}),
            "labels": {
                MANAGED_LABEL: "true",
                MANAGED_BY: OPERATOR_NAME,
                "emporium.dev/owner-kind": owner["kind"],
                "emporium.dev/owner-name": owner["metadata"]["name"],
            },
            "ownerReferences": [owner_reference(owner)],
        },
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def decode_data(secret: dict[str, Any] | None) -> dict[str, str]:
    if not secret:
        return {}
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
