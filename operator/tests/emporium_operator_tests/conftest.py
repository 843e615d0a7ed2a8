"""Fixtures for the operator's tests: CRDs in the test bed's control plane, a namespace per module, admin
Secrets and server objects pointing at the test bed's Postgres and RabbitMQ, and a KopfRunner."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Short timers for tests: read when emporium_operator.main is first imported (only the operator reads them).
os.environ.setdefault("EMPORIUM_RECONCILE_INTERVAL", "4")
os.environ.setdefault("EMPORIUM_TIMER_IDLE", "1")
os.environ.setdefault("EMPORIUM_RETRY_DELAY", "2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = _free_port()

import pytest  # noqa: E402
from kopf.testing import KopfRunner  # noqa: E402
from kubernetes import client, config  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

CRDS = Path(__file__).resolve().parents[3] / "charts" / "emporium-operator" / "crds"
GROUP, VERSION = "emporium.dev", "v1alpha1"
PLURALS = {
    "PostgresServer": "postgresservers",
    "PostgresDatabase": "postgresdatabases",
    "RabbitServer": "rabbitservers",
    "RabbitVhost": "rabbitvhosts",
    "RabbitTopology": "rabbittopologies",
}


def kubectl_bin() -> str:
    return str(Path.home() / ".cache/emporium/toolchain/bin/kubectl")


class Kube:
    """Thin helpers over the official client for tests (sync; the operator runs in its own thread)."""

    def __init__(self, kubeconfig: Path):
        self.kubeconfig = kubeconfig
        self.api_client = config.new_client_from_config(str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [kubectl_bin(), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def create(self, ns: str, kind: str, name: str, spec: dict[str, Any], **meta: Any) -> dict:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name, **meta},
            "spec": spec,
        }
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[kind], body)

    def get(self, ns: str, kind: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[kind], name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_spec(self, ns: str, kind: str, name: str, spec: dict[str, Any]) -> dict:
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURALS[kind], name, {"spec": spec}
        )

    def delete(self, ns: str, kind: str, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[kind], name)

    def secret(self, ns: str, name: str) -> dict[str, str] | None:
        try:
            s = self.core.read_namespaced_secret(name, ns)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}

    def create_secret(self, ns: str, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(
            ns, client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
        )


def condition(obj: dict | None, type_: str = "Ready") -> dict:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


async def wait_for(predicate: Callable[[], Any], within: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as e:  # the object may not exist yet
            last = e
        else:
            if last:
                return last
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last value: {last!r}")


async def wait_ready(
    kube: Kube, ns: str, kind: str, name: str, within: float = 30, status: str = "True"
) -> dict:
    def check():
        obj = kube.get(ns, kind, name)
        c = condition(obj)
        return (
            obj
            if c.get("status") == status
            and ((obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"])
            else None
        )

    return await wait_for(check, within, f"{kind}/{name} Ready={status}")


async def wait_reason(
    kube: Kube, ns: str, kind: str, name: str, reason: str, type_: str = "Ready", within: float = 30
) -> dict:
    return await wait_for(
        lambda: (
            condition(kube.get(ns, kind, name), type_).get("reason") == reason and kube.get(ns, kind, name)
        ),
        within,
        f"{kind}/{name} {type_} reason {reason}",
    )


async def wait_gone(kube: Kube, ns: str, kind: str, name: str, within: float = 30) -> None:
    await wait_for(lambda: kube.get(ns, kind, name) is None, within, f"{kind}/{name} deleted")


def events(kube: Kube, ns: str, name: str, reason: str, type_: str = "Warning") -> list:
    found = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [e for e in found if e.reason == reason and e.type == type_]


@pytest.fixture(scope="session")
def kube(control_plane) -> Iterator[Kube]:
    k = Kube(control_plane.kubeconfig)
    k.kubectl("apply", "--server-side", "-f", str(CRDS))
    for plural in PLURALS.values():
        k.kubectl("wait", "--for=condition=Established", f"crd/{plural}.{GROUP}", "--timeout=30s")
    # The in-process operator logs in with KUBECONFIG and serves metrics on METRICS_PORT; both are
    # restored afterwards so other parts' tests in the same session see the environment they expect.
    saved = {key: os.environ.get(key) for key in ("KUBECONFIG", "METRICS_PORT")}
    os.environ["KUBECONFIG"] = str(control_plane.kubeconfig)
    os.environ["METRICS_PORT"] = str(METRICS_PORT)
    try:
        yield k
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def new_namespace(kube: Kube, prefix: str) -> str:
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    return ns


def setup_servers(kube: Kube, ns: str, postgres, rabbitmq) -> None:
    """Admin Secrets plus a PostgresServer 'pg' and a RabbitServer 'rabbit' for the test bed's servers."""
    kube.create_secret(ns, "pg-admin", {"username": postgres.superuser, "password": postgres.password})
    kube.create_secret(
        ns, "rabbit-admin", {"username": rabbitmq.admin_user, "password": rabbitmq.admin_password}
    )
    kube.create(
        ns,
        "PostgresServer",
        "pg",
        {
            "host": postgres.host,
            "port": postgres.port,
            "sslMode": "disable",
            "adminSecretRef": {"name": "pg-admin"},
        },
    )
    kube.create(
        ns,
        "RabbitServer",
        "rabbit",
        {
            "managementUrl": rabbitmq.management_url,
            "amqpHost": rabbitmq.host,
            "amqpPort": rabbitmq.amqp_port,
            "adminSecretRef": {"name": "rabbit-admin"},
        },
    )


def unique(prefix: str) -> str:
    """A name no other test uses (tests never depend on objects another test left)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def runner_args(ns: str | list[str], liveness_port: int | None = None) -> list[str]:
    args = ["run", "-m", "emporium_operator.main", "--standalone"]
    for namespace in [ns] if isinstance(ns, str) else ns:
        args.append(f"--namespace={namespace}")
    if liveness_port:
        args.append(f"--liveness=http://127.0.0.1:{liveness_port}/healthz")
    return args


@contextlib.contextmanager
def operator(ns: str | list[str], liveness_port: int | None = None) -> Iterator[KopfRunner]:
    with KopfRunner(runner_args(ns, liveness_port), timeout=60) as runner:
        yield runner


@pytest.fixture(scope="module")
def env(kube: Kube, postgres, rabbitmq) -> Iterator[dict]:
    """A namespace with servers and a running operator for a test module."""
    ns = new_namespace(kube, "op")
    setup_servers(kube, ns, postgres, rabbitmq)
    port = _free_port()
    with operator(ns, port) as runner:
        yield {"ns": ns, "runner": runner, "liveness_port": port, "metrics_port": METRICS_PORT}


Kube.condition = staticmethod(condition)
Kube.wait_for = staticmethod(wait_for)
Kube.wait_ready = wait_ready
Kube.wait_reason = wait_reason
Kube.wait_gone = wait_gone
Kube.events = events
Kube.new_namespace = new_namespace
Kube.unique = staticmethod(unique)
Kube.operator = staticmethod(operator)
Kube.metrics_port = METRICS_PORT
Kube.free_port = staticmethod(_free_port)


@pytest.fixture(scope="session")
def servers(postgres, rabbitmq) -> Callable[[Kube, str], None]:
    return lambda kube, ns: setup_servers(kube, ns, postgres, rabbitmq)
