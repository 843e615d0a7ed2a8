"""Where the operator may act: servers (and their admin Secrets) in one namespace used from others, the
chart's least-privilege RBAC (the operator runs as the chart's ServiceAccount), namespace deletion that
never hangs, and two replicas of which one is active."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import yaml
from emporium_testbed.toolchain import REPO_ROOT, tool
from kubernetes import client

PG_DB = "PostgresDatabase"
CHART = REPO_ROOT / "charts" / "emporium-operator"


def admin_servers(kube, ns: str, postgres, allowed: dict | None = None) -> None:
    kube.create_secret(ns, "pg-admin", {"username": postgres.superuser, "password": postgres.password})
    spec = {
        "host": postgres.host,
        "port": postgres.port,
        "sslMode": "disable",
        "adminSecretRef": {"name": "pg-admin"},
    }
    if allowed is not None:
        spec["allowedNamespaces"] = allowed
    kube.create(ns, "PostgresServer", "shared", spec)


def secret_names(kube, ns: str) -> set[str]:
    return {s.metadata.name for s in kube.core.list_namespaced_secret(ns).items}


async def test_cross_namespace_server_needs_the_servers_permission(kube, postgres):
    servers_ns = kube.new_namespace("servers")
    listed, labelled, other = (kube.new_namespace(p) for p in ("tenant", "team", "stranger"))
    kube.core.patch_namespace(labelled, {"metadata": {"labels": {"emporium.dev/tenant": "yes"}}})
    admin_servers(kube, servers_ns, postgres, {"names": [listed]})
    with kube.operator([servers_ns, listed, labelled, other]):
        await kube.wait_ready(servers_ns, "PostgresServer", "shared")
        for ns in (listed, labelled, other):
            kube.create(
                ns,
                PG_DB,
                "app",
                {
                    "serverRef": {"name": "shared", "namespace": servers_ns},
                    "databaseName": f"{ns.replace('-', '_')}_app",
                },
            )
        obj = await kube.wait_ready(listed, PG_DB, "app")
        assert obj["status"]["server"] == "shared"
        conn = await asyncpg.connect(kube.secret(listed, "app-db")["uri"])
        await conn.close()
        for ns in (labelled, other):
            obj = await kube.wait_reason(ns, PG_DB, "app", "NamespaceNotAllowed")
            assert "allowedNamespaces" in kube.condition(obj)["message"]
        # A selector on namespace labels admits the labelled namespace; the woken object becomes Ready.
        kube.patch_spec(
            servers_ns,
            "PostgresServer",
            "shared",
            {
                "allowedNamespaces": {
                    "names": [listed],
                    "selector": {"matchLabels": {"emporium.dev/tenant": "yes"}},
                }
            },
        )
        await kube.wait_ready(labelled, PG_DB, "app", within=10)
        assert kube.condition(kube.get(other, PG_DB, "app"))["reason"] == "NamespaceNotAllowed"
    # Tenants never held a copy of the admin Secret.
    for ns in (listed, labelled, other):
        assert "pg-admin" not in secret_names(kube, ns)


def render_chart(release_ns: str, namespaces: list[str], fullname: str) -> list[dict]:
    out = subprocess.run(
        [
            tool("helm"),
            "template",
            "emporium-operator",
            str(CHART),
            "--namespace",
            release_ns,
            "--set",
            f"fullnameOverride={fullname}",
            "--set-json",
            f"namespaces={__import__('json').dumps(namespaces)}",
            "--set",
            "leaderElection.leaseDurationSeconds=4",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def service_account_kubeconfig(kube, control_plane, ns: str, sa: str, path: Path) -> Path:
    token = kube.kubectl("create", "token", sa, "-n", ns, "--duration=1h").stdout.strip()
    ca = base64.b64encode(control_plane.pki.path("ca.crt").read_bytes()).decode()
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "sa",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": control_plane.server, "certificate-authority-data": ca},
                    }
                ],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa, "namespace": ns}}],
            }
        )
    )
    path.chmod(0o600)
    return path


def run_deployment(deployment: dict, kubeconfig: Path, log: Path, identity: str) -> subprocess.Popen:
    """The chart's Deployment as a local process: its command and env, with the given kubeconfig."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = [a for a in container["command"] if not a.startswith("--liveness")]
    assert command[:2] == ["kopf", "run"]
    env = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
    env |= {"METRICS_PORT": "0", "EMPORIUM_LEASE_RENEW": "1", "EMPORIUM_LEASE_IDENTITY": identity}
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "kopf"), *command[1:]],
        env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def kubectl_as(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("kubectl"), f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=30
    )


def lease_holder(kube, ns: str, name: str) -> str | None:
    try:
        lease = client.CoordinationV1Api(kube.api_client).read_namespaced_lease(name, ns)
    except client.ApiException:
        return None
    return lease.spec.holder_identity


def can_i(kube, sa: str, *args: str) -> bool:
    result = kube.kubectl("auth", "can-i", *args, f"--as={sa}", check=False)
    return result.stdout.strip() == "yes"


async def test_chart_rbac_two_replicas_one_active(kube, control_plane, postgres, tmp_path):
    """The operator runs as the chart's ServiceAccount with the chart's Roles and command, twice; only the
    Lease holder reconciles; killing it hands over; it can read no Secret in kube-system."""
    op_ns, tenant = kube.new_namespace("opsys"), kube.new_namespace("tenant")
    fullname = f"emporium-operator-{op_ns[-6:]}"
    docs = render_chart(op_ns, [tenant], fullname)
    for doc in docs:  # helm leaves the release namespace implicit on namespaced objects
        if not doc["kind"].startswith("Cluster"):
            doc["metadata"].setdefault("namespace", op_ns)
    kube.kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump_all(
            [
                d
                for d in docs
                if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
            ]
        ),
    )
    sa = f"system:serviceaccount:{op_ns}:{fullname}"
    # Least privilege, as the API server decides it.
    assert not can_i(kube, sa, "get", "secrets", "-n", "kube-system")
    assert not can_i(kube, sa, "list", "secrets", "-n", "kube-system")
    assert not can_i(kube, sa, "list", "secrets", "--all-namespaces")
    assert not can_i(kube, sa, "delete", "secrets", "-n", tenant)
    assert can_i(kube, sa, "create", "secrets", "-n", tenant)
    assert not can_i(kube, sa, "create", "postgresdatabases.emporium.dev", "-n", tenant)
    assert not can_i(kube, sa, "list", "postgresdatabases.emporium.dev", "-n", "default")

    admin_servers(kube, op_ns, postgres, {"names": [tenant]})
    kubeconfig = service_account_kubeconfig(kube, control_plane, op_ns, fullname, tmp_path / "sa.kubeconfig")
    # The ServiceAccount's token really is refused on kube-system's Secrets.
    result = kubectl_as(kubeconfig, "get", "secrets", "-n", "kube-system")
    assert result.returncode != 0 and "forbidden" in result.stderr.lower()

    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    logs = {i: tmp_path / f"operator-{i}.log" for i in ("a", "b")}
    procs = {i: run_deployment(deployment, kubeconfig, logs[i], i) for i in ("a", "b")}
    try:
        kube.create(
            tenant,
            PG_DB,
            "first",
            {
                "serverRef": {"name": "shared", "namespace": op_ns},
                "databaseName": f"{tenant.replace('-', '_')}_1",
            },
        )
        await kube.wait_ready(tenant, PG_DB, "first", within=180)
        active = lease_holder(kube, op_ns, fullname)
        assert active in procs, active
        standby = "b" if active == "a" else "a"
        for i, proc in procs.items():
            assert proc.poll() is None, logs[i].read_text()[-3000:]
        procs[active].send_signal(signal.SIGKILL)
        procs[active].wait(timeout=10)
        kube.create(
            tenant,
            PG_DB,
            "second",
            {
                "serverRef": {"name": "shared", "namespace": op_ns},
                "databaseName": f"{tenant.replace('-', '_')}_2",
            },
        )
        await kube.wait_ready(tenant, PG_DB, "second", within=120)
        assert lease_holder(kube, op_ns, fullname) == standby
        conn = await asyncpg.connect(kube.secret(tenant, "second-db")["uri"])
        await conn.close()
        text = logs[standby].read_text()
        assert "403" not in text and "Forbidden" not in text, text[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


async def test_namespace_deletion_never_hangs(kube, servers, postgres, rabbitmq):
    """Retain objects carry no finalizer (gone even with no operator running); Delete objects whose server
    goes with the namespace are released."""
    idle, busy = kube.new_namespace("gone"), kube.new_namespace("gone")
    servers(kube, idle)
    servers(kube, busy)
    with kube.operator([idle, busy]):
        kube.create(
            idle,
            PG_DB,
            "kept",
            {"serverRef": {"name": "pg"}, "databaseName": f"{idle.replace('-', '_')}_kept"},
        )
        kube.create(
            busy,
            PG_DB,
            "dropped",
            {
                "serverRef": {"name": "pg"},
                "databaseName": f"{busy.replace('-', '_')}_x",
                "reclaimPolicy": "Delete",
            },
        )
        kube.create(
            busy,
            "RabbitVhost",
            "v",
            {"serverRef": {"name": "rabbit"}, "name": f"v-{busy}", "reclaimPolicy": "Delete"},
        )
        await kube.wait_ready(idle, PG_DB, "kept")
        await kube.wait_ready(busy, PG_DB, "dropped")
        await kube.wait_ready(busy, "RabbitVhost", "v")
        kube.core.delete_namespace(busy)
        await kube.wait_for(
            lambda: busy not in {n.metadata.name for n in kube.core.list_namespace().items},
            within=60,
            what="namespace gone",
        )
    # No operator now: a namespace of Retain objects still goes.
    kube.core.delete_namespace(idle)
    await kube.wait_for(
        lambda: idle not in {n.metadata.name for n in kube.core.list_namespace().items},
        within=60,
        what="namespace gone",
    )
