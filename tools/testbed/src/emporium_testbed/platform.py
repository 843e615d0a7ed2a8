"""The whole platform on one machine: the same charts a kind cluster gets, with local processes where
pods would run.

``up`` (idempotent) starts the local servers (control plane, Postgres, RabbitMQ, SMTP sink), installs
the CRDs (ours, Istio's, prometheus-operator's), the operator chart and the umbrella chart with Helm,
runs the operator as its chart's ServiceAccount, waits for the chart's databases and topologies to be
Ready, runs the chart's migration Jobs and starts the chart's Deployments as local processes.

    python -m emporium_testbed.platform up|down|status [--root .local]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import json
import os
import re
import runpy
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from .ingress import FIXED_PORTS, GATEWAY_NAMESPACE, LocalIngress
from .local import DEFAULT_ROOT, OIDC_ISSUER_ID, LocalServers
from .observability import LocalObservability, LocalTracing
from .process import (
    ManagedProcess,
    StartupError,
    describe_process,
    free_port,
    listener_pid,
    port_open,
    wait_until,
)
from .toolchain import REPO_ROOT, bin_dir, tool
from .workloads import LocalContainer, container_process

NAMESPACE = "emporium"
OPERATOR_NAMESPACE = "emporium-system"
CHARTS = REPO_ROOT / "charts"
LOCAL_VALUES = REPO_ROOT / "k8s" / "values" / "local.yaml"
GROUP = "emporium.dev"
MONITORING_CRDS = {
    f"monitoring.coreos.com_{plural}.yaml" for plural in ("servicemonitors", "podmonitors", "prometheusrules")
}
T = TypeVar("T")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it


class StepFailed(RuntimeError):
    """One step of `up` failed; the message names the step and, through the cause, the log to read."""

    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step


class StepCancelled(StepFailed):
    """A step not started because another one had failed."""


@dataclass
class Workload:
    """A Deployment of a chart that runs here as a process."""

    namespace: str
    name: str
    container: LocalContainer
    process: ManagedProcess


class LocalPlatform:
    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        self.servers = LocalServers(self.root)
        self.run_dir = self.root / "run"
        self.logs = self.servers.logs
        self.kubeconfig = self.servers.control_plane.kubeconfig
        self.ports_path = self.root / "ports.json"
        self.ingress = LocalIngress(self.root, self.kubeconfig, self.logs)
        self.observability = LocalObservability(self.root, self.servers)
        self.tracing = LocalTracing(self.root, self.logs)
        self._failed = threading.Event()
        self._lock = threading.RLock()
        self._rendered: dict[tuple[str, str, bool], list[dict]] = {}

    # -- helpers -------------------------------------------------------------------------------------

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [tool("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise StartupError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def helm(self, *args: str) -> str:
        result = subprocess.run(
            [tool("helm"), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise StartupError(f"helm {' '.join(args[:2])}: {result.stderr.strip()}")
        return result.stdout

    def apply(self, manifests: str) -> None:
        self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=emporium-local",
            "-f",
            "-",
            stdin=manifests,
        )

    def _ports(self) -> dict[str, int]:
        """Local ports of every workload's container ports, chosen once and kept across `up`s."""
        return json.loads(self.ports_path.read_text()) if self.ports_path.exists() else {}

    def _port(self, key: str) -> int:
        ports = self._ports()
        if key not in ports:
            ports[key] = free_port()
            self.ports_path.write_text(json.dumps(ports, indent=2))
        return ports[key]

    # -- steps ---------------------------------------------------------------------------------------

    def install_crds(self) -> None:
        """Ours, Istio's and the prometheus-operator CRDs the charts use, in one server-side apply."""
        crds = sorted((CHARTS / "emporium-operator" / "crds").glob("*.yaml"))
        schemas = runpy.run_path(str(REPO_ROOT / "tools" / "toolchain" / "schemas" / "crd_schemas.py"))
        schemas["third_party"]()  # fetched from the Go module proxy once, then cached
        # The charts create ServiceMonitors, PodMonitors and PrometheusRules only. The other seven
        # prometheus-operator CRDs (4 MB of schema: Prometheus, Alertmanager, ...) would cost the API server
        # seconds of OpenAPI work at every start for objects nobody creates here.
        crds += [
            path
            for path in schemas["third_party_crd_files"]()
            if "monitoring.coreos.com_" not in path.name or path.name in MONITORING_CRDS
        ]
        manifests = "\n---\n".join(Path(crd).read_text() for crd in crds)
        # The apply costs seconds (2 MB of schema); after a `make down` the same CRDs are still stored.
        applied = self.servers.control_plane.base_dir / "crds.sha256"
        digest = hashlib.sha256(manifests.encode()).hexdigest()
        expected = len(re.findall(r"^kind: CustomResourceDefinition\s*$", manifests, flags=re.MULTILINE))
        if applied.exists() and applied.read_text() == digest:
            stored = self.servers.control_plane.list_metadata(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
            )
            if len(stored) >= expected:
                return
        self.apply(manifests)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        applied.write_text(digest)

    def apply_servers(self) -> None:
        """Namespaces and the PostgresServer/RabbitServer the charts refer to, pointing at local servers."""
        pg, rabbit = self.servers.postgres, self.servers.rabbitmq
        docs = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            for name in (NAMESPACE, OPERATOR_NAMESPACE, GATEWAY_NAMESPACE)
        ]
        docs += [
            _secret("postgres-admin", {"username": pg.superuser, "password": pg.password}),
            {
                "apiVersion": f"{GROUP}/v1alpha1",
                "kind": "PostgresServer",
                "metadata": {"name": "postgres", "namespace": NAMESPACE},
                "spec": {
                    "host": pg.host,
                    "port": pg.port,
                    "sslMode": "disable",
                    "adminSecretRef": {"name": "postgres-admin"},
                },
            },
            _secret("rabbitmq-admin", {"username": rabbit.admin_user, "password": rabbit.admin_password}),
            {
                "apiVersion": f"{GROUP}/v1alpha1",
                "kind": "RabbitServer",
                "metadata": {"name": "rabbit", "namespace": NAMESPACE},
                "spec": {
                    "managementUrl": rabbit.management_url,
                    "amqpHost": rabbit.host,
                    "amqpPort": rabbit.amqp_port,
                    "adminSecretRef": {"name": "rabbitmq-admin"},
                },
            },
        ]
        manifests = "\n---\n".join(yaml.safe_dump(d) for d in docs)
        # Skipped when the same objects were applied before and are still stored (after a `make down`).
        record = self.servers.control_plane.base_dir / "servers.sha256"
        digest = hashlib.sha256(manifests.encode()).hexdigest()
        if record.exists() and record.read_text() == digest:
            stored = {
                (kind, m["name"])
                for kind, plural in (("PostgresServer", "postgresservers"), ("RabbitServer", "rabbitservers"))
                for m in self.servers.control_plane.list_metadata(
                    f"/apis/{GROUP}/v1alpha1/namespaces/{NAMESPACE}/{plural}"
                )
            }
            if {("PostgresServer", "postgres"), ("RabbitServer", "rabbit")} <= stored:
                return
        self.apply(manifests)
        record.write_text(digest)

    def install_charts(self) -> None:
        """The operator's chart and the umbrella chart, side by side (neither needs the other's objects).

        Skipped when neither chart, nor the values, nor the arguments changed since the last install
        and both releases are still deployed: after a `make down` the objects are still stored."""
        operator_args = [
            "upgrade",
            "--install",
            "emporium-operator",
            str(CHARTS / "emporium-operator"),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--skip-crds",
        ]
        # No hooks: a hook Job would never run without a kubelet; migrations run as processes instead.
        umbrella_args = [
            "upgrade",
            "--install",
            "emporium",
            str(CHARTS / "emporium"),
            "--namespace",
            NAMESPACE,
            "--no-hooks",
            "-f",
            str(LOCAL_VALUES),
            "--set",
            f"notifications.env.SMTP_HOST=127.0.0.1,notifications.env.SMTP_PORT={self.servers.smtp_port}",
            # "Sign in with" the local OpenID provider (any name and claims on its login page: a lab only).
            "--set-json",
            "users.oidc.providers=" + json.dumps([self.oidc_provider()]),
            "--set",
            f"users.oidc.redirectBaseUrl={self.ingress.url},users.oidc.cookieSecure=false",
        ]
        record = self.servers.control_plane.base_dir / "charts.sha256"
        digest = _charts_digest([operator_args, umbrella_args])
        if record.exists() and record.read_text() == digest and self._releases_deployed():
            return
        record.unlink(missing_ok=True)
        self._rendered.clear()
        with ThreadPoolExecutor(1) as pool:
            operator_chart = pool.submit(self.helm, *operator_args)
            self.helm("dependency", "build", str(CHARTS / "emporium"))
            self.helm(*umbrella_args)
            operator_chart.result()
        record.write_text(digest)

    def _releases_deployed(self) -> bool:
        """Both releases have a deployed revision (Helm keeps its release records as Secrets)."""
        names = self.kubectl("get", "secrets", "-A", "-l", "owner=helm,status=deployed", "-o", "name")
        releases = {line.rsplit(".", 2)[-2] for line in names.split() if line.count(".") >= 2}
        return {"emporium", "emporium-operator"} <= releases

    def oidc_provider(self) -> dict:
        return {
            "name": "mock",
            "displayName": "Test ID (local)",
            "issuer": self.servers.oidc.issuer(OIDC_ISSUER_ID),
            "clientId": "emporium-local",
        }

    def rendered(self, release: str, namespace: str, hooks: bool = False) -> list[dict]:
        """The release's manifests (or hooks) as Helm stored them; read once per `up` (each read is a
        Helm process and a parse of the dashboards), a fresh copy for every caller."""
        key = (release, namespace, hooks)
        with self._lock:
            if key not in self._rendered:
                text = self.helm("get", "hooks" if hooks else "manifest", release, "--namespace", namespace)
                self._rendered[key] = [d for d in yaml.load_all(text, Loader=_YAML_LOADER) if d]
            return copy.deepcopy(self._rendered[key])

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig with a token of the ServiceAccount: the process gets exactly the chart's RBAC."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration=720h").strip()
        cp = self.servers.control_plane
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "sa",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {
                        "server": cp.server,
                        "certificate-authority-data": base64.b64encode(
                            cp.pki.path("ca.crt").read_bytes()
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [
                {"name": "sa", "context": {"cluster": "local", "user": name, "namespace": namespace}}
            ],
        }
        path = self.run_dir / f"{namespace}-{name}.kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _reader(self):
        """Reads Secrets and ConfigMaps as the admin, with plain GETs (the Kubernetes client library
        alone takes a second or more of CPU to import, on the path of every start)."""
        control_plane = self.servers.control_plane

        def read(kind: str, namespace: str, name: str) -> dict[str, bytes]:
            plural = "secrets" if kind == "Secret" else "configmaps"
            path = f"/api/v1/namespaces/{namespace}/{plural}/{name}"
            data = json.loads(control_plane.get(path)).get("data")
            if kind == "Secret":
                return {k: base64.b64decode(v) for k, v in (data or {}).items()}
            return {k: v.encode() for k, v in (data or {}).items()}

        return read

    def _addresses(self, deployments: list[dict]) -> dict[tuple[str, str], tuple[str, int]]:
        addresses = {
            (d["metadata"].get("namespace", NAMESPACE), d["metadata"]["name"]): (
                "127.0.0.1",
                self._port(f"{d['metadata']['name']}/http"),
            )
            for d in deployments
        }
        # the services' OTLP endpoint (local values): the local OpenTelemetry Collector
        addresses[("observability", "otel-collector")] = ("127.0.0.1", self.tracing.port("otlp-http"))
        return addresses

    def workload(self, manifest: dict, namespace: str, addresses, kind: str = "deploy") -> Workload:
        manifest["metadata"].setdefault("namespace", namespace)
        name = manifest["metadata"]["name"]
        pod = manifest["spec"]["template"]["spec"]
        ports = {
            p["containerPort"]: self._port(f"{name}/{p.get('name', p['containerPort'])}")
            for c in pod["containers"]
            for p in c.get("ports", [])
        }
        local = container_process(
            manifest, self._reader(), addresses, self.run_dir / "volumes", port_map=ports
        )
        for path, data in local.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o600)
        env = dict(local.env)
        env.setdefault("HOST", "127.0.0.1")
        sa = pod.get("serviceAccountName")
        if sa and pod.get("automountServiceAccountToken", False):
            env["KUBECONFIG"] = str(self.service_account_kubeconfig(namespace, sa))
        process = ManagedProcess(
            f"{kind}/{name}",
            _python(local.argv),
            self.logs / f"{name}.log",
            env=env,
            pid_path=self.run_dir / f"{kind}-{name}.pid",
        )
        return Workload(namespace, name, local, process)

    def start_operator(self) -> Workload:
        manifests = self.rendered("emporium-operator", OPERATOR_NAMESPACE)
        deployment = next(d for d in manifests if d["kind"] == "Deployment")
        operator = self.workload(deployment, OPERATOR_NAMESPACE, {})
        if not operator.process.running():
            operator.process.start()
            liveness = operator.container.ports.get("healthz")
            if liveness:
                operator.process.wait_ready(lambda: port_open("127.0.0.1", liveness), 60)
        return operator

    def wait_for_resources(self, timeout: float = 180) -> None:
        """Every database, vhost and topology Ready, with one kubectl call for all three kinds."""
        plurals = ("rabbitvhosts", "postgresdatabases", "rabbittopologies")
        objects = [
            item
            for plural in plurals
            for item in json.loads(
                self.servers.control_plane.get(f"/apis/{GROUP}/v1alpha1/namespaces/{NAMESPACE}/{plural}")
            )["items"]
        ]
        if all(_ready(item) for item in objects):  # none yet, or (after a `make down`) all still Ready
            return
        kinds = ",".join(f"{plural}.{GROUP}" for plural in plurals)
        wait_for = ("--for=condition=Ready", f"--timeout={int(timeout)}s")
        self.kubectl("wait", kinds, "--all", "-n", NAMESPACE, *wait_for)

    def run_migrations(self) -> None:
        """The chart's migration Jobs, all at once (each service has its own database)."""
        manifests = self.rendered("emporium", NAMESPACE)
        addresses = self._addresses([d for d in manifests if d["kind"] == "Deployment"])
        jobs = [d for d in self.rendered("emporium", NAMESPACE, hooks=True) if d["kind"] == "Job"]
        migrations = [self.workload(job, NAMESPACE, addresses, kind="job") for job in jobs]
        with ThreadPoolExecutor(max(1, len(migrations))) as pool:
            for failure in pool.map(self._migrate, migrations):
                if failure:
                    raise StartupError(failure)

    def _migrate(self, migration: Workload) -> str | None:
        log = self.logs / f"{migration.name}.log"
        record = self.run_dir / f"{migration.name}.migrated"
        inputs = _migration_inputs(migration.process.argv, migration.process.env or {})
        database_url = (migration.process.env or {}).get("DATABASE_URL")
        if inputs and database_url and record.exists():
            # After a `make down` the databases are where the last run left them: when neither the
            # migrations nor the database changed since, a process (seconds of imports) would do nothing.
            done = json.loads(record.read_text())
            if done.get("inputs") == inputs and done.get("revision") == _alembic_revision(database_url):
                return None
        record.unlink(missing_ok=True)
        result = subprocess.run(
            migration.process.argv,
            env={**os.environ, **migration.process.env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            return f"migration {migration.name} failed; see {log}:\n{result.stderr[-2000:]}"
        if inputs and database_url:
            record.write_text(json.dumps({"inputs": inputs, "revision": _alembic_revision(database_url)}))
        return None

    def start_services(self, after: list[Future] | None = None) -> list[Workload]:
        """Start the chart's Deployments, then (once the ``after`` steps have ended) wait until each
        one is ready."""
        deployments = [d for d in self.rendered("emporium", NAMESPACE) if d["kind"] == "Deployment"]
        addresses = self._addresses(deployments)
        workloads = [self.workload(d, NAMESPACE, addresses) for d in deployments]
        for w in workloads:
            if not w.process.running():
                w.process.start()
        for step in after or []:
            step.result()
        for w in workloads:
            port = w.container.port
            w.process.wait_ready(lambda port=port: _http_ok(f"http://127.0.0.1:{port}/readyz"), 90)
        return workloads

    def register_endpoints(self, workloads: list[Workload]) -> None:
        """Point each Service at its local process. The API server refuses loopback addresses in
        Endpoints and EndpointSlices, so the endpoint is an Istio WorkloadEntry carrying the labels the
        Service selects (istiod merges it into the Service): the chart's Services and routes stay as
        they are."""
        services = {
            d["metadata"]["name"]: d for d in self.rendered("emporium", NAMESPACE) if d["kind"] == "Service"
        }
        entries = []
        for w in workloads:
            service = services.get(w.name)
            if not service:
                continue
            labels = service["spec"]["selector"]
            entries.append(
                {
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "WorkloadEntry",
                    "metadata": {"name": f"{w.name}-local", "namespace": NAMESPACE, "labels": labels},
                    "spec": {"address": "127.0.0.1", "labels": labels, "ports": {"http": w.container.port}},
                }
            )
        self.apply("\n---\n".join(yaml.safe_dump(e) for e in entries))

    def wait_for_ingress(self, timeout: float = 120) -> None:
        """The gateway serves the chart's routes: /health reaches the users service."""
        self.ingress.gateway.wait_ready(lambda: _http_ok(f"{self.ingress.url}/health"), timeout)

    def admin_token(self, timeout: float = 120) -> str:
        """Log in as the first admin. The users service creates that account in the background once it
        is up (a bcrypt hash, slow on a busy machine): wait for its row first, so that no failed login
        counts against the login throttle."""
        data = self._reader()("Secret", NAMESPACE, "users-admin")
        email = data["ADMIN_EMAIL"].decode()
        dbname = self._reader()("Secret", NAMESPACE, "users-db")["dbname"].decode()
        dsn = self.servers.postgres.dsn(dbname)

        def admin_exists() -> bool:
            return (
                asyncio.run(_fetchval(dsn, "SELECT count(*) FROM users WHERE email = $1", email.lower())) == 1
            )

        wait_until(
            admin_exists,
            timeout,
            "the first admin account (created by the users service)",
            self.logs / "users.log",
        )
        body = {"email": email, "password": data["ADMIN_PASSWORD"].decode()}
        return _json_request("POST", f"{self.ingress.url}/users/login", body)["access_token"]

    def load_sample_catalog(self) -> int:
        """On the first start only (a marker file remembers it), add the sample products as the admin,
        through the ingress, as a person would."""
        marker = self.root / "catalog-loaded"
        if marker.exists():
            return 0
        catalog = json.loads((Path(__file__).parent / "data" / "sample-catalog.json").read_text())
        token = self.admin_token()
        for product in catalog:
            _json_request(
                "POST", f"{self.ingress.url}/products", product, token=token, ok_statuses=(201, 409)
            )
        marker.write_text(f"{len(catalog)} products\n")
        return len(catalog)

    # -- commands ------------------------------------------------------------------------------------

    def up(self) -> None:
        """Start what is not running yet, as much as possible at once, printing each step as it ends.

        Postgres, RabbitMQ and the SMTP sink start beside the control plane; the ingress (istiod,
        Envoy) starts as soon as the charts are installed, beside the operator, migrations and services;
        the services start while RabbitMQ may still be booting.
        The first failure anywhere stops the others at their next step, and is the one reported.
        """
        started = time.monotonic()
        self.check_fixed_ports()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.servers.prepare()
        self._failed.clear()
        background: list[Future] = []

        def beside(name: str, action: Callable[[], object]) -> Future:
            future = pool.submit(self.step, name, action)
            future.add_done_callback(lambda f: f.exception() and self._failed.set())
            background.append(future)
            return future

        with ThreadPoolExecutor(10) as pool:
            try:
                postgres = beside("postgres", self.servers.start_postgres)
                brokers = [
                    beside("rabbitmq", self.servers.start_rabbitmq),
                    beside("smtp sink", self.servers.start_smtp),
                ]
                # Only "Sign in with" needs the OpenID provider, and the users service asks it lazily.
                oidc = beside("openid provider", self.servers.start_oidc)
                self.step(
                    "control plane",
                    lambda: self.servers.start_control_plane(wait_for_controllers=False),
                )
                # Nothing below needs a controller right away (namespace deletion, garbage collection).
                controllers = beside("controller manager", self.servers.control_plane.wait_for_controllers)
                self.step("custom resource definitions", self.install_crds)
                self.step("namespaces, PostgresServer, RabbitServer", self.apply_servers)
                self.step("charts (helm upgrade --install)", self.install_charts)
                ingress = beside("ingress (istiod, Envoy)", self.ingress.start)
                # Beside the rest: after a `make down` the objects are still Ready and the databases
                # migrated, so services need not wait for the operator; on a first start the wait for
                # Ready below waits for it.
                operator = beside("operator", self.start_operator)
                tracing = beside("trace pipeline (OpenTelemetry Collector, Jaeger)", self.start_tracing)
                postgres.result()
                self.step("databases, vhosts and topologies Ready", self.wait_for_resources)
                self.step("migrations", self.run_migrations)
                # The services import their frameworks (seconds each) while RabbitMQ is still booting;
                # they connect to it once it answers, as pods do.
                workloads = self.step("services", lambda: self.start_services(after=brokers))
                observability = beside("prometheus, postgres_exporter", self.start_observability)
                self.step("service endpoints", lambda: self.register_endpoints(workloads))
                for future in (operator, ingress, tracing, observability, controllers, oidc):
                    future.result()
            except BaseException as error:
                self._failed.set()  # the other threads stop at their next step
                failure = error
            else:
                failure = None
        # Every thread has finished here. Report the first real failure, not a step it cancelled.
        causes = [f.exception() for f in background if f.exception()]
        causes = [c for c in [*causes, failure] if c is not None and not isinstance(c, StepCancelled)]
        if causes or failure:
            raise causes[0] if causes else failure
        self.step("routes through the ingress", self.wait_for_ingress)
        self.write_admin_env()
        self.step("sample catalog", self.load_sample_catalog)
        self.print_summary(workloads, time.monotonic() - started)

    def step(self, name: str, action: Callable[[], T]) -> T:
        if self._failed.is_set():
            raise StepCancelled(name, RuntimeError("cancelled: another step failed"))
        began = time.monotonic()
        try:
            result = action()
        except StepFailed:
            raise
        except Exception as error:
            raise StepFailed(name, error) from error
        print(f"  ok  {name} ({time.monotonic() - began:.1f} s)", flush=True)
        return result

    def check_fixed_ports(self) -> None:
        """The ingress's ports are fixed: refuse, before starting anything, when another process (another
        clone's platform, say) holds one of them."""
        ours = {p.pid for p in self.ingress.processes() if p.running()}
        for port in FIXED_PORTS:
            if not port_open("127.0.0.1", port):
                continue
            owner = listener_pid(port)
            if owner is not None and (owner in ours or _process_group(owner) in ours):
                continue
            raise StartupError(_port_taken_message(port, owner))

    def processes(self) -> list[ManagedProcess]:
        """Every process of this platform: the servers, the ingress and the chart's workloads."""
        workloads = [
            ManagedProcess(pid_file.stem, [], self.logs / "down.log", pid_path=pid_file)
            for pid_file in sorted(self.run_dir.glob("*.pid"))
            if pid_file not in {p.pid_path for p in (*self.ingress.processes(), *self.servers.processes())}
        ]
        return [*workloads, *self.ingress.processes(), *self.servers.processes()]

    def running_pids(self) -> set[int]:
        return {p.pid for p in self.processes() if p.pid is not None and p.running()}

    def stop_started_since(self, before: set[int]) -> list[str]:
        """Stop every process of the platform that was not running before (after a failed `up`)."""
        stopped = []
        for process in self.processes():
            if process.pid is not None and process.running() and process.pid not in before:
                process.stop()
                stopped.append(process.name)
        return stopped

    def print_summary(self, workloads: list[Workload], seconds: float) -> None:
        url = self.ingress.url
        path = f"{bin_dir()}:{Path.home() / '.local' / 'bin'}:$PATH"
        print(f"\nEmporium is up ({seconds:.0f} s): {url}")
        for w in workloads:
            print(f"  {w.name:14} http://127.0.0.1:{w.container.port}")
        for name, _, address in self.observability.status() + self.tracing.status():
            print(f"  {name:14} {address}")
        print(f"  admin credentials: {self.root / 'admin.env'}")
        print(f"  logs: {self.logs}  (make status, make down)")
        print("\nIn a new shell, first:")
        print(f"  export KUBECONFIG={_shell_quote(self.kubeconfig)} PATH={_shell_quote_path(path)}")
        print("\nNext, try:")
        print(f"  1. the catalog:    curl -s '{url}/products?limit=3'")
        print("  2. the walkthrough in README.md (register, log in, order, see the notification)")
        print("  3. ten simulated shoppers for a minute:    make loadgen")

    def start_tracing(self) -> None:
        """Jaeger and the OpenTelemetry Collector; the gateway reaches the collector through a ServiceEntry
        of the host istiod's OpenTelemetry provider names (the API server refuses loopback endpoints)."""
        from .ingress import OTEL_COLLECTOR_HOST

        self.tracing.start()
        entry = {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "otel-collector-local", "namespace": GATEWAY_NAMESPACE},
            "spec": {
                "hosts": [OTEL_COLLECTOR_HOST],
                "location": "MESH_INTERNAL",
                "resolution": "STATIC",
                "ports": [
                    {
                        "number": 4317,
                        "name": "grpc-otlp",
                        "protocol": "GRPC",
                        "targetPort": self.tracing.port("otlp-grpc"),
                    }
                ],
                "endpoints": [{"address": "127.0.0.1"}],
            },
        }
        self.apply(yaml.safe_dump(entry))

    def start_observability(self) -> None:
        """Prometheus scraping what the charts' ServiceMonitors and PodMonitors select (plus RabbitMQ and
        postgres_exporter), evaluating the alert rules of the chart's PrometheusRule as Helm rendered it."""
        from .observability import rule_groups

        emporium = self.rendered("emporium", NAMESPACE)
        operator = self.rendered("emporium-operator", OPERATOR_NAMESPACE)
        for docs, namespace in ((emporium, NAMESPACE), (operator, OPERATOR_NAMESPACE)):
            for doc in docs:
                doc["metadata"].setdefault("namespace", namespace)
        monitors = [d for d in emporium + operator if d["kind"] in ("ServiceMonitor", "PodMonitor")]
        self.observability.start(monitors, self._ports(), rule_groups(emporium))

    def write_admin_env(self) -> None:
        data = self._reader()("Secret", NAMESPACE, "users-admin")
        path = self.root / "admin.env"
        path.write_text(
            f"ADMIN_EMAIL={data['ADMIN_EMAIL'].decode()}\nADMIN_PASSWORD={data['ADMIN_PASSWORD'].decode()}\n"
        )
        path.chmod(0o600)

    def down(self) -> None:
        for pid_file in sorted(self.run_dir.glob("*.pid")):
            ManagedProcess(pid_file.stem, [], self.logs / "down.log", pid_path=pid_file).stop()
        self.servers.down()

    def status(self) -> list[tuple[str, bool, str]]:
        rows = [(c.name, c.running, c.detail) for c in self.servers.status()]
        ports = self._ports()
        for pid_file in sorted(self.run_dir.glob("*.pid")):
            if pid_file in (self.servers.smtp.pid_path, self.servers.oidc.pid_path):
                continue  # listed with the servers above
            if pid_file.stem.startswith("observability-"):
                continue  # listed below with its URL
            process = ManagedProcess(pid_file.stem, [], self.logs / "status.log", pid_path=pid_file)
            name = pid_file.stem.split("-", 1)[1]
            port = ports.get(f"{name}/http")
            rows.append((pid_file.stem, process.running(), f"http://127.0.0.1:{port}" if port else ""))
        return rows + self.observability.status() + self.tracing.status()


def _ready(item: dict) -> bool:
    """The object's Ready condition is True for its current generation."""
    status = item.get("status") or {}
    ready = [c for c in status.get("conditions", []) if c.get("type") == "Ready"]
    generation = item["metadata"].get("generation")
    observed = ready[0].get("observedGeneration", status.get("observedGeneration")) if ready else None
    return bool(ready) and ready[0].get("status") == "True" and observed in (None, generation)


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _port_taken_message(port: int, owner: int | None) -> str:
    if owner is None:
        return (
            f"127.0.0.1:{port} is already in use (the local ingress needs it): free it, then `make up` again"
        )
    cwd = Path(f"/proc/{owner}/cwd")
    try:
        home = cwd.resolve()
    except OSError:
        home = None
    if home is not None and home.name == "ingress" and (home.parent / "state.json").exists():
        return (
            f"another Emporium local platform is running, from {home.parent} (it holds 127.0.0.1:{port}); "
            f"one runs per machine: stop it first (`make down` in that clone)"
        )
    return f"127.0.0.1:{port} is already in use by {describe_process(owner)}: the local ingress needs it"


def _shell_quote(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def _shell_quote_path(path: str) -> str:
    """Quote a PATH value but keep its trailing $PATH expandable."""
    head = path.removesuffix(":$PATH")
    return f'"{head}:$PATH"' if any(c.isspace() for c in head) else path


def _secret(name: str, data: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "type": "Opaque",
        "stringData": data,
    }


def _charts_digest(arguments: list[list[str]]) -> str:
    """A digest of every chart's files (not the dependency archives Helm builds from them), the local
    values and the Helm arguments."""
    digest = hashlib.sha256(json.dumps(arguments).encode())
    for path in sorted([*CHARTS.rglob("*"), LOCAL_VALUES]):
        if path.is_file() and path.suffix != ".tgz":
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _migration_inputs(argv: list[str], env: dict[str, str]) -> str | None:
    """A digest of what a migration Job's outcome depends on: its command, its environment and the
    service's migration scripts (``python -m emporium_<svc> migrate`` -> services/<svc>/migrations).
    None when the scripts cannot be found (the Job then always runs)."""
    import importlib.util

    if len(argv) < 3 or argv[1] != "-m":
        return None
    spec = importlib.util.find_spec(argv[2].split(".")[0])
    if spec is None or spec.origin is None:
        return None
    scripts = Path(spec.origin).resolve().parents[2] / "migrations"
    if not scripts.is_dir():
        return None
    digest = hashlib.sha256(json.dumps([argv, sorted(env.items())]).encode())
    for path in sorted(scripts.rglob("*.py")):
        digest.update(str(path.relative_to(scripts)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _alembic_revision(database_url: str) -> str | None:
    """The database's alembic revision(s), or None when it has none (or cannot be read)."""
    dsn = re.sub(r"^postgresql\+\w+://", "postgresql://", database_url)
    try:
        rows = asyncio.run(_fetch(dsn, "SELECT version_num FROM alembic_version ORDER BY 1"))
    except Exception:
        return None
    return ",".join(row[0] for row in rows) or None


def _python(argv: list[str]) -> list[str]:
    """Containers run `python -m ...`: here that is this environment's interpreter; `kopf` likewise."""
    if argv and argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    if argv and argv[0] == "kopf":
        return [sys.executable, "-m", "kopf", *argv[1:]]
    return argv


async def _fetch(dsn: str, query: str, *args: object) -> list:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


async def _fetchval(dsn: str, query: str, *args: object) -> object:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


def _json_request(
    method: str, url: str, body: object, token: str | None = None, ok_statuses: tuple[int, ...] = (200, 201)
) -> dict:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method=method, headers={"Content-Type": "application/json"}
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        if error.code in ok_statuses:
            return {}
        raise StartupError(f"{method} {url}: {error.code} {error.read()[:300]!r}") from error


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("EMPORIUM_LOCAL", DEFAULT_ROOT)))
    args = parser.parse_args(argv)
    platform = LocalPlatform(args.root)
    if args.command == "up":
        return _up(platform)
    if args.command == "down":
        platform.down()
    rows = platform.status()
    for name, running, detail in rows:
        print(f"{name:24} {'running' if running else 'stopped':8} {detail}")
    return 0 if args.command == "down" or all(r for _, r, _ in rows) else 3


def _up(platform: LocalPlatform) -> int:
    """`make up`: on any failure, say what failed and where its log is, and stop what this run started."""
    try:
        before = platform.running_pids()
    except FileNotFoundError as error:  # the toolchain is missing
        print(f"make up: {error}", file=sys.stderr)
        return 1
    try:
        platform.up()
        return 0
    except (Exception, KeyboardInterrupt) as error:
        if isinstance(error, StepFailed):
            print(f"\nmake up failed at: {error.step}\n{error.__cause__}", file=sys.stderr)
        else:
            print(f"\nmake up cannot start: {error}", file=sys.stderr)
        stopped = platform.stop_started_since(before)
        if stopped:
            print(f"stopped what this run had started: {', '.join(stopped)}", file=sys.stderr)
        print(f"every component's log: {platform.logs}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
