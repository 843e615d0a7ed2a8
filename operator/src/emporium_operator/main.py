"""Wiring only: Kopf settings, login, and which Kopf event feeds which module.

Run: ``kopf run -m emporium_operator.main --standalone --namespace emporium --namespace emporium-system``.
Each kind lives in its own module (pg_server, pg_database, rabbit_server, rabbit_vhost, rabbit_topology:
reconcile, delete, lookups); engine.py schedules the reconciles, leader.py elects the active replica."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from . import (
    managed_secrets,
    metrics,
    pg_database,
    pg_server,
    postgres,
    rabbit_server,
    rabbit_topology,
    rabbit_vhost,
)
from .common import GROUP, VERSION
from .engine import ENGINE, KindSpec
from .kube import KUBE
from .leader import Elector
from .secrets import MANAGED_LABEL

KINDS = (pg_server, pg_database, rabbit_server, rabbit_vhost, rabbit_topology)
CLEANUP = (pg_database, rabbit_vhost, rabbit_topology)  # kinds with something to drop on deletion
_elector: Elector | None = None
_elector_task: asyncio.Task | None = None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _elector, _elector_task
    settings.persistence.finalizer = "emporium.dev/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="emporium.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="emporium.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 4
    settings.queueing.error_delays = [1, 2, 5, 10, 20, 30, 60]
    settings.scanning.disabled = True  # no CRD/namespace discovery watches: fixed namespaces, no cluster RBAC
    # Only our own Secrets are streamed from the API server (server-side label selector).
    settings.watching.label_selectors["secrets"] = f"{MANAGED_LABEL}=true"
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # DEBUG: the engine logs where each reconcile's time went (queue, Kubernetes, Postgres, RabbitMQ calls,
    # status), without Kopf's own debug output (``kopf run --verbose`` shows both).
    logging.getLogger("emporium_operator").setLevel(os.environ.get("EMPORIUM_LOG_LEVEL", "NOTSET").upper())
    metrics.serve()
    for module in KINDS:
        ENGINE.register(KindSpec(module.KIND, module.PLURAL, module.reconcile))
    ENGINE.start()
    rabbit_server.forget_clients()  # clients of an earlier run in this process belong to its event loop
    postgres.forget_pools()
    pg_server.forget_admin_secrets()
    lease_namespace = os.environ.get("EMPORIUM_LEASE_NAMESPACE")
    if lease_namespace:
        _elector = Elector(lease_namespace, ENGINE.set_active)
        _elector_task = asyncio.create_task(_elector.run(), name="emporium-leader")
    else:
        ENGINE.set_active(True)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    KUBE.set_info(info)
    return info


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if _elector_task is not None:
        _elector_task.cancel()
    if _elector is not None:
        await _elector.release()
    await ENGINE.stop()
    await rabbit_server.close_clients()
    await postgres.close_pools()
    await KUBE.close()


@kopf.on.probe(id="objects")
def probe(**_: Any) -> int:
    # Reports, never fails on external systems: a down broker must not restart the operator.
    return len(ENGINE.bodies)


@kopf.on.probe(id="active")
def active(**_: Any) -> bool:
    return ENGINE.is_active


def _feed(plural: str):
    # async: Kopf runs sync handlers in a thread pool, and the engine lives on the event loop.
    async def event(type: str | None, body: kopf.Body, **_: Any) -> None:
        ENGINE.observe(plural, type, dict(body))

    return event


for _module in KINDS:
    kopf.on.event(GROUP, VERSION, _module.PLURAL, id=f"{_module.PLURAL}-store")(_feed(_module.PLURAL))
for _module in CLEANUP:
    kopf.on.delete(GROUP, VERSION, _module.PLURAL, when=_module.needs_cleanup, id=f"{_module.PLURAL}-delete")(
        _module.delete
    )
kopf.on.event("", "v1", "secrets", labels={MANAGED_LABEL: "true"}, id="managed-secrets")(
    managed_secrets.changed
)
