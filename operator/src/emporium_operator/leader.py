"""Two replicas, one active: a coordination.k8s.io Lease. The holder renews it every RENEW seconds; a
standby takes it over when it has not been renewed for DURATION seconds (the holder died), and a holder
that cannot renew in time steps down before a standby can take over."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from .kube import KUBE

log = logging.getLogger("emporium_operator.leader")

DURATION = float(os.environ.get("EMPORIUM_LEASE_DURATION", "15"))
RENEW = float(os.environ.get("EMPORIUM_LEASE_RENEW", "3"))
NAME = os.environ.get("EMPORIUM_LEASE_NAME", "emporium-operator")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


class Elector:
    def __init__(self, namespace: str, on_change: Callable[[bool], None], identity: str | None = None):
        self.namespace = namespace
        self.identity = (
            identity
            or os.environ.get("EMPORIUM_LEASE_IDENTITY")
            or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        )
        self.on_change = on_change
        self.leading = False
        self.renewed_at = 0.0

    @property
    def path(self) -> str:
        return (
            f"/apis/coordination.k8s.io/v1/namespaces/{quote(self.namespace, safe='')}/leases/{quote(NAME)}"
        )

    def _set(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            log.warning(
                "%s %s the lease %s/%s", self.identity, "holds" if leading else "lost", self.namespace, NAME
            )
            self.on_change(leading)

    def _spec(self, lease: dict[str, Any] | None) -> dict[str, Any]:
        spec = dict((lease or {}).get("spec") or {})
        now = _fmt(_now())
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease else 0)
        spec.update(
            {"holderIdentity": self.identity, "leaseDurationSeconds": int(DURATION), "renewTime": now}
        )
        return spec

    async def try_once(self) -> None:
        loop = asyncio.get_running_loop()
        lease = await KUBE.get(self.path)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": NAME, "namespace": self.namespace},
                "spec": self._spec(None),
            }
            response = await KUBE.client.post(self.path.rsplit("/", 1)[0], json=body)
            if response.status_code in (200, 201):
                self.renewed_at = loop.time()
                self._set(True)
            return
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        renewed = _parse(spec.get("renewTime"))
        duration = float(spec.get("leaseDurationSeconds") or DURATION)
        expired = renewed is None or (_now() - renewed).total_seconds() > duration
        if holder != self.identity and holder and not expired:
            self._set(False)
            return
        body = {**lease, "spec": self._spec(lease)}
        response = await KUBE.client.put(self.path, json=body)  # resourceVersion: optimistic concurrency
        if response.status_code == 200:
            self.renewed_at = loop.time()
            self._set(True)
        elif response.status_code == 409:
            self._set(False)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.try_once()
            except (
                httpx.HTTPError,
                OSError,
                ValueError,
                RuntimeError,
            ) as e:  # RuntimeError: not logged in yet
                log.warning("lease %s/%s: %s", self.namespace, NAME, e)
            if self.leading and loop.time() - self.renewed_at > DURATION * 2 / 3:
                self._set(False)  # could not renew: step down before anyone may take over
            await asyncio.sleep(RENEW)

    async def release(self) -> None:
        """On a clean shutdown: let a standby take over at once."""
        if not self.leading:
            return
        lease = await KUBE.get(self.path)
        if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
            lease["spec"]["renewTime"] = _fmt(_now() - dt.timedelta(seconds=DURATION * 2))
            await KUBE.client.put(self.path, json=lease)
