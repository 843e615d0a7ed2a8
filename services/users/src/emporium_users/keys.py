"""Signing keys and the published key set (JWKS), with rotation.

``JWT_KEYS_DIR`` holds PEM private keys (a Secret mount in Kubernetes):

- ``current.pem``: signs new tokens (required);
- ``next.pem``: published ahead of use, so verifiers (Istio refreshes every 20 min) already know it when it
  becomes current;
- ``previous.pem``: still published, so tokens it signed verify until they expire.

Rotation = previous <- current <- next <- new key (``python -m emporium_users rotate-keys`` does it for a
local directory; in Kubernetes update the Secret the same way). The directory is re-read when its files
change, so a rotated Secret is picked up without a restart. The ``kid`` is the key's RFC 7638 thumbprint,
so it stays the same when a file is renamed. EC P-256 keys sign ES256, RSA keys RS256.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

log = logging.getLogger("emporium.users.keys")

SLOTS = ("current", "next", "previous")
RELOAD_CHECK_SECONDS = 10.0


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private_key: Any
    public_jwk: dict[str, Any]


def _thumbprint(jwk: dict[str, Any]) -> str:
    # RFC 7638: the required members only, sorted, no whitespace.
    members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def signing_key_from_pem(pem: bytes) -> SigningKey:
    private_key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("EC keys must use P-256 (ES256)")
        alg, jwk = "ES256", json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key()))
    elif isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < 2048:
            raise ValueError("RSA keys must have at least 2048 bits")
        alg, jwk = "RS256", json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    else:
        raise ValueError("only EC P-256 and RSA keys are supported")
    kid = _thumbprint(jwk)
    jwk.update(kid=kid, alg=alg, use="sig")
    return SigningKey(kid=kid, alg=alg, private_key=private_key, public_jwk=jwk)


def new_private_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, pem: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    tmp.replace(path)  # atomic: a concurrent reader sees the old or the new key, never half a file


def generate_local_keys(directory: Path) -> None:
    """First local run: create current.pem and next.pem (never overwrites existing keys)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for slot in ("current", "next"):
        path = directory / f"{slot}.pem"
        if not path.exists():
            _write_private(path, new_private_key_pem())
            log.info("generated signing key %s", path)


def rotate_keys(directory: Path) -> None:
    """previous <- current <- next <- a new key."""
    current, nxt, previous = (directory / f"{slot}.pem" for slot in SLOTS)
    if not nxt.exists():
        _write_private(nxt, new_private_key_pem())
    if current.exists():
        _write_private(previous, current.read_bytes())
    _write_private(current, nxt.read_bytes())
    _write_private(nxt, new_private_key_pem())


class KeyRing:
    """The keys of ``directory``, re-read when its files change (checked at most every few seconds)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._fingerprint: tuple = ()
        self._checked_at = float("-inf")
        self._keys: dict[str, SigningKey] = {}
        self.reload()

    def _stat(self) -> tuple:
        # Kubernetes updates Secret mounts by swapping a symlink: compare resolved paths and mtimes.
        entries = []
        for slot in SLOTS:
            path = self.directory / f"{slot}.pem"
            if path.exists():
                stat = path.stat()
                entries.append((slot, str(path.resolve()), stat.st_mtime_ns, stat.st_size))
        return tuple(entries)

    def reload(self) -> None:
        with self._lock:
            fingerprint = self._stat()
            keys = {}
            for slot in SLOTS:
                path = self.directory / f"{slot}.pem"
                if path.exists():
                    keys[slot] = signing_key_from_pem(path.read_bytes())
            if "current" not in keys:
                raise FileNotFoundError(f"no signing key: {self.directory / 'current.pem'} is missing")
            self._keys, self._fingerprint = keys, fingerprint
            self._checked_at = time.monotonic()

    def _refresh(self) -> None:
        if time.monotonic() - self._checked_at < RELOAD_CHECK_SECONDS:
            return
        self._checked_at = time.monotonic()
        if self._stat() != self._fingerprint:
            try:
                self.reload()
                log.info("signing keys reloaded", extra={"kids": [k.kid for k in self._keys.values()]})
            except (OSError, ValueError) as exc:  # half-written rotation: keep serving the old keys
                log.warning("keeping the previous keys, reload failed: %r", exc)

    @property
    def current(self) -> SigningKey:
        self._refresh()
        return self._keys["current"]

    def jwks(self) -> dict[str, Any]:
        """Public keys only, current first; the same key in two slots is published once."""
        self._refresh()
        seen, keys = set(), []
        for slot in SLOTS:
            key = self._keys.get(slot)
            if key and key.kid not in seen:
                seen.add(key.kid)
                keys.append(dict(key.public_jwk))
        return {"keys": keys}
