"""The operator chart and the umbrella chart installed with helm into the test bed's control plane (with
our, Istio's and prometheus-operator's CRDs): every object is accepted; the operator, running against
the same API server, brings the chart's PostgresDatabase, RabbitVhost and RabbitTopology objects to Ready;
then every Secret the Deployments and migration Jobs read exists with the keys they read."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from emporium_testbed.process import free_port
from emporium_testbed.toolchain import tool

from .conftest import SERVICES, crd_schemas, helm_args_for, parse, run, skaffold_profiles

pytestmark = pytest.mark.slow

READY_KINDS = {
    "PostgresDatabase": "postgresdatabases",
    "RabbitVhost": "rabbitvhosts",
    "RabbitTopology": "rabbittopologies",
}


class Cluster:
    def __init__(self, kubeconfig: Path, helm: str) -> None:
        self.kubeconfig = str(kubeconfig)
        self.helm_bin = helm
        self.kubectl_bin = tool("kubectl")

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return run([self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args], input=input).stdout

    def helm(self, *args: str) -> str:
        return run([self.helm_bin, "--kubeconfig", self.kubeconfig, *args]).stdout

    def get(self, kind: str, name: str, ns: str) -> dict:
        return json.loads(self.kubectl("get", kind, name, "-n", ns, "-o", "json"))

    def secret(self, name: str, ns: str) -> dict[str, str]:
        data = self.get("secret", name, ns).get("data") or {}
        return {key: base64.b64decode(value).decode() for key, value in data.items()}


def _ready(obj: dict) -> bool:
    status = obj.get("status") or {}
    return (
        any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
        and status.get("observedGeneration") == obj["metadata"]["generation"]
    )


@pytest.fixture(scope="module")
def installed(control_plane, postgres, rabbitmq, helm, charts_dir, tmp_path_factory) -> Iterator[dict]:
    cluster = Cluster(control_plane.kubeconfig, helm)
    suffix = secrets.token_hex(3)
    ns, op_ns, gw_ns = f"charts-{suffix}", f"charts-op-{suffix}", f"charts-gw-{suffix}"
    base = tmp_path_factory.mktemp("install")

    # Istio's and prometheus-operator's CRDs, as istio/base and kube-prometheus-stack install them
    for path in crd_schemas.third_party_crd_files():
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    for name in (ns, gw_ns):
        cluster.kubectl("create", "namespace", name)
    # the operator chart: its CRDs (crds/), RBAC (a Role in each namespace it serves), Deployment,
    # PodMonitor, NetworkPolicy
    operator_out = cluster.helm(
        "install",
        "emporium-operator",
        str(charts_dir / "emporium-operator"),
        "-n",
        op_ns,
        "--create-namespace",
        "--set",
        f"fullnameOverride=emporium-operator-{suffix}",
        "--set-json",
        f'namespaces=["{ns}"]',
    )
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    cluster.kubectl("label", "namespace", ns, "istio-injection=enabled")

    # the servers (what k8s/dev/servers.yaml declares on kind), here for the test bed's Postgres/RabbitMQ
    cluster.kubectl(
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "postgres-admin",
        f"--from-literal=username={postgres.superuser}",
        f"--from-literal=password={postgres.password}",
    )
    cluster.kubectl(
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "rabbitmq-admin",
        f"--from-literal=username={rabbitmq.admin_user}",
        f"--from-literal=password={rabbitmq.admin_password}",
    )
    servers = f"""
apiVersion: emporium.dev/v1alpha1
kind: PostgresServer
metadata: {{name: postgres, namespace: {ns}}}
spec:
  host: "{postgres.host}"
  port: {postgres.port}
  sslMode: disable
  adminSecretRef: {{name: postgres-admin}}
---
apiVersion: emporium.dev/v1alpha1
kind: RabbitServer
metadata: {{name: rabbit, namespace: {ns}}}
spec:
  managementUrl: "{rabbitmq.management_url}"
  amqpHost: "{rabbitmq.host}"
  amqpPort: {rabbitmq.amqp_port}
  adminSecretRef: {{name: rabbitmq-admin}}
"""
    cluster.kubectl("apply", "-f", "-", input=servers)

    # the platform; unique database, vhost and broker user names: the test bed's servers are shared
    # skaffold's default deployment (k8s/values/kind.yaml, its image bindings) plus unique names
    (platform,) = [r for r in skaffold_profiles()["default"] if r["name"] == "emporium"]
    values = helm_args_for(platform)
    values += ["--set", f"ingress.gatewayNamespace={gw_ns}", "--set", f"global.rabbitVhost=charts-{suffix}"]
    # kind.yaml turns autoscaling off; keep one service's HPA and PDB so the API server sees them too
    # monitoring (kind.yaml turns it on, but not the dashboards): this API server has the CRDs
    values += ["--set", "global.monitoring.enabled=true", "--set", "monitoring.rules.enabled=true"]
    values += ["--set", "monitoring.dashboards.enabled=true"]
    values += ["--set", "users.autoscaling.enabled=true", "--set", "users.podDisruptionBudget.enabled=true"]
    for svc in SERVICES:
        values += [
            "--set",
            f"{svc}.database.name=charts_{suffix}_{svc}",
            "--set",
            f"{svc}.rabbitmq.user=charts-{suffix}-{svc}",
        ]
    # No hooks here: the migration Jobs would wait for a kubelet; they are checked by a server dry run.
    platform_out = cluster.helm(
        "install", "emporium", str(charts_dir / "emporium"), "-n", ns, "--no-hooks", *values
    )

    log = base / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": cluster.kubeconfig,
        "METRICS_PORT": "0",
        "EMPORIUM_RECONCILE_INTERVAL": "4",
        "EMPORIUM_TIMER_IDLE": "1",
        "EMPORIUM_RETRY_DELAY": "2",
    }
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kopf",
            "run",
            "-m",
            "emporium_operator.main",
            "--namespace",
            ns,
            "--standalone",
        ],
        env=env,
        cwd=base,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        yield {
            "cluster": cluster,
            "ns": ns,
            "op_ns": op_ns,
            "gw_ns": gw_ns,
            "values": values,
            "operator": operator,
            "log": log,
            "operator_out": operator_out,
            "platform_out": platform_out,
            "charts_dir": charts_dir,
        }
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=20)
        except subprocess.TimeoutExpired:
            operator.kill()


def test_every_object_is_accepted(installed) -> None:
    cluster, ns = installed["cluster"], installed["ns"]
    assert "STATUS: deployed" in installed["operator_out"] and "NOTES:" in installed["operator_out"]
    assert "STATUS: deployed" in installed["platform_out"] and "NOTES:" in installed["platform_out"]
    for release, release_ns in (("emporium-operator", installed["op_ns"]), ("emporium", ns)):
        objects = parse(cluster.helm("get", "manifest", release, "-n", release_ns))
        expected = {(o["kind"], o["metadata"]["name"]) for o in objects}
        for obj in objects:  # objects in the gateway's namespace name it; the rest go to the release's
            obj["metadata"].setdefault("namespace", release_ns)
        manifest = yaml.safe_dump_all(objects)
        live = parse(cluster.kubectl("get", "-f", "-", "-o", "yaml", input=manifest))
        found = {(o["kind"], o["metadata"]["name"]) for item in live for o in item.get("items", [item])}
        assert expected == found
    kinds = {o["kind"] for o in parse(cluster.helm("get", "manifest", "emporium", "-n", ns))}
    assert {
        "Gateway",
        "VirtualService",
        "RequestAuthentication",
        "AuthorizationPolicy",
        "PeerAuthentication",
        "ServiceMonitor",
        "PrometheusRule",
        "PostgresDatabase",
        "RabbitTopology",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "Deployment",
    } <= kinds


def test_migration_hooks_are_accepted(installed) -> None:
    cluster, ns = installed["cluster"], installed["ns"]
    hooks = cluster.helm("get", "hooks", "emporium", "-n", ns)
    jobs = [o for o in parse(hooks) if o["kind"] == "Job"]
    assert {j["metadata"]["name"] for j in jobs} == {f"{svc}-migrate" for svc in SERVICES}
    out = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=hooks)
    assert out.count("created (server dry run)") == len(jobs)


def wait_until_ready(installed) -> None:
    """Until the operator has made every PostgresDatabase, RabbitVhost and RabbitTopology Ready."""
    if installed.get("ready"):
        return
    cluster, ns, operator = installed["cluster"], installed["ns"], installed["operator"]
    deadline = time.monotonic() + 150
    pending: list[str] = []
    while time.monotonic() < deadline:
        assert operator.poll() is None, installed["log"].read_text()[-4000:]
        pending = []
        for kind, plural in READY_KINDS.items():
            for obj in json.loads(cluster.kubectl("get", plural, "-n", ns, "-o", "json"))["items"]:
                if not _ready(obj):
                    pending.append(f"{kind}/{obj['metadata']['name']}: {obj.get('status')}")
        if not pending:
            break
        time.sleep(1)
    assert not pending, "\n".join(pending) + "\n" + installed["log"].read_text()[-4000:]
    installed["ready"] = True


def test_operator_makes_the_chart_resources_ready(installed) -> None:
    wait_until_ready(installed)
    cluster, ns = installed["cluster"], installed["ns"]
    counts = {
        k: len(json.loads(cluster.kubectl("get", p, "-n", ns, "-o", "json"))["items"])
        for k, p in READY_KINDS.items()
    }
    assert counts == {"PostgresDatabase": 4, "RabbitVhost": 1, "RabbitTopology": 3}


def test_every_referenced_secret_exists_with_its_keys(installed) -> None:
    """After the operator: each Secret a Deployment or a migration Job reads, with each key it reads."""
    wait_until_ready(installed)
    cluster, ns = installed["cluster"], installed["ns"]
    objects = parse(cluster.helm("get", "manifest", "emporium", "-n", ns))
    objects += parse(cluster.helm("get", "hooks", "emporium", "-n", ns))
    refs = set()
    for obj in objects:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        spec = obj["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        for volume in spec.get("volumes", []):
            if "secret" in volume and not volume["secret"].get("optional"):  # optional: e.g. users-oidc
                refs.add((volume["secret"]["secretName"], None))
    assert {name for name, _ in refs} >= {f"{svc}-db" for svc in SERVICES} | {
        "users-amqp",
        "orders-amqp",
        "notifications-amqp",
        "users-jwt-keys",
        "users-admin",
        "products-internal-token",
    }
    for name, key in sorted(refs, key=str):
        data = cluster.secret(name, ns)
        if key:
            assert data.get(key), f"Secret {name} has no key {key} (keys: {sorted(data)})"
    users_db = cluster.secret("users-db", ns)
    assert users_db["dbname"] == f"charts_{ns.removeprefix('charts-')}_users"
    assert users_db["DATABASE_URL"].startswith("postgresql://")
    assert cluster.secret("orders-amqp", ns)["AMQP_URL"].startswith("amqp://")
    assert set(cluster.secret("users-jwt-keys", ns)) == {"current.pem", "next.pem"}


def test_upgrade_keeps_generated_secrets(installed) -> None:
    """Signing keys, the admin password and the internal token survive `helm upgrade` (lookup)."""
    cluster, ns = installed["cluster"], installed["ns"]
    names = ("users-jwt-keys", "users-admin", "products-internal-token")
    before = {name: cluster.secret(name, ns) for name in names}
    cluster.helm(
        "upgrade",
        "emporium",
        str(installed["charts_dir"] / "emporium"),
        "-n",
        ns,
        "--no-hooks",
        *installed["values"],
    )
    assert {name: cluster.secret(name, ns) for name in names} == before


def resolved_env(cluster: Cluster, ns: str, container: dict, overrides: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet would build it (values and Secret keys)."""
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = cluster.secret(ref["name"], ns)[ref["key"]]
    return {**env, **overrides}


def _local(command: list[str]) -> list[str]:
    assert command[:2] == ["python", "-m"], command
    return [sys.executable, *command[1:]]


def test_services_run_with_the_wiring_the_charts_give_them(installed, tmp_path) -> None:
    """Each service's migration Job command and Deployment command, run here with the environment the
    charts give them (Secrets resolved from the cluster): the migration succeeds on the database the
    operator made, and the service is ready on it; users signs with the chart's generated keys."""
    wait_until_ready(installed)
    cluster, ns = installed["cluster"], installed["ns"]
    objects = parse(cluster.helm("get", "manifest", "emporium", "-n", ns))
    objects += parse(cluster.helm("get", "hooks", "emporium", "-n", ns))
    workloads = {
        (o["kind"], o["metadata"]["name"]): o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    }
    keys_dir = tmp_path / "jwt-keys"  # the users-jwt-keys volume, as the kubelet would mount it
    keys_dir.mkdir()
    for name, pem in cluster.secret("users-jwt-keys", ns).items():
        (keys_dir / name).write_text(pem)
    overrides = {"JWT_KEYS_DIR": str(keys_dir), "LOG_LEVEL": "WARNING"}
    procs = []
    try:
        ports = {}
        for svc in SERVICES:
            job = workloads[("Job", f"{svc}-migrate")]["containers"][0]
            migrate = subprocess.run(
                _local(job["command"]),
                env={**os.environ, **resolved_env(cluster, ns, job, overrides)},
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert migrate.returncode == 0, f"{svc} migrate:\n{migrate.stdout}\n{migrate.stderr}"
            deployment = workloads[("Deployment", svc)]["containers"][0]
            ports[svc] = free_port()
            env = resolved_env(cluster, ns, deployment, {**overrides, "PORT": str(ports[svc])})
            log = tmp_path / f"{svc}.log"
            procs.append(
                subprocess.Popen(
                    _local(deployment["command"]),
                    env={**os.environ, **env},
                    cwd=tmp_path,
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
        for (svc, port), proc in zip(ports.items(), procs, strict=True):
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, (tmp_path / f"{svc}.log").read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
                        assert response.status == 200
                        break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / f"{svc}.log").read_text()[-3000:]
                    time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['products']}/products", timeout=5) as response:
            assert response.status == 200  # the migrated schema is there
        with urllib.request.urlopen(
            f"http://127.0.0.1:{ports['users']}/.well-known/jwks.json", timeout=5
        ) as response:
            keys = json.loads(response.read())["keys"]
        assert len(keys) == 2 and {k["alg"] for k in keys} == {"ES256"}  # current.pem and next.pem
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
