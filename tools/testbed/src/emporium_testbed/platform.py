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
import base64
import json
import os
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .ingress import GATEWAY_NAMESPACE, LocalIngress
from .local import DEFAULT_ROOT, OIDC_ISSUER_ID, LocalServers
from .process import ManagedProcess, StartupError, free_port, port_open
from .toolchain import REPO_ROOT, tool
from .workloads import LocalContainer, container_process

NAMESPACE = "emporium"
OPERATOR_NAMESPACE = "emporium-system"
CHARTS = REPO_ROOT / "charts"
LOCAL_VALUES = REPO_ROOT / "k8s" / "values" / "local.yaml"
GROUP = "emporium.dev"


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
        crds = sorted((CHARTS / "emporium-operator" / "crds").glob("*.yaml"))
        schemas = runpy.run_path(str(REPO_ROOT / "tools" / "toolchain" / "schemas" / "crd_schemas.py"))
        crds += schemas["third_party_crd_files"]() if _third_party_ready(schemas) else []
        if not _third_party_ready(schemas):
            schemas["third_party"]()  # fetch from the Go module proxy once, then cached
            crds += schemas["third_party_crd_files"]()
        for crd in crds:
            self.apply(Path(crd).read_text())
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")

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
        self.apply("\n---\n".join(yaml.safe_dump(d) for d in docs))

    def install_charts(self) -> None:
        self.helm(
            "upgrade",
            "--install",
            "emporium-operator",
            str(CHARTS / "emporium-operator"),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--skip-crds",
        )
        self.helm("dependency", "build", str(CHARTS / "emporium"))
        # No hooks: a hook Job would never run without a kubelet; migrations run below as processes.
        self.helm(
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
        )

    def oidc_provider(self) -> dict:
        return {
            "name": "mock",
            "displayName": "Test ID (local)",
            "issuer": self.servers.oidc.issuer(OIDC_ISSUER_ID),
            "clientId": "emporium-local",
        }

    def rendered(self, release: str, namespace: str, hooks: bool = False) -> list[dict]:
        text = self.helm("get", "hooks" if hooks else "manifest", release, "--namespace", namespace)
        return [d for d in yaml.safe_load_all(text) if d]

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
        from kubernetes import client, config

        from .workloads import kube_reader

        return kube_reader(client.CoreV1Api(config.new_client_from_config(config_file=str(self.kubeconfig))))

    def _addresses(self, deployments: list[dict]) -> dict[tuple[str, str], tuple[str, int]]:
        return {
            (d["metadata"].get("namespace", NAMESPACE), d["metadata"]["name"]): (
                "127.0.0.1",
                self._port(f"{d['metadata']['name']}/http"),
            )
            for d in deployments
        }

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
        for kind in ("rabbitvhosts", "postgresdatabases", "rabbittopologies"):
            kind_ref = f"{kind}.{GROUP}"
            if not self.kubectl("get", kind_ref, "-n", NAMESPACE, "-o", "name").strip():
                continue
            self.kubectl(
                "wait",
                kind_ref,
                "--all",
                "-n",
                NAMESPACE,
                "--for=condition=Ready",
                f"--timeout={int(timeout)}s",
            )

    def run_migrations(self) -> None:
        manifests = self.rendered("emporium", NAMESPACE)
        addresses = self._addresses([d for d in manifests if d["kind"] == "Deployment"])
        for job in (d for d in self.rendered("emporium", NAMESPACE, hooks=True) if d["kind"] == "Job"):
            migration = self.workload(job, NAMESPACE, addresses, kind="job")
            result = subprocess.run(
                migration.process.argv,
                env={**os.environ, **migration.process.env},
                capture_output=True,
                text=True,
                timeout=300,
            )
            (self.logs / f"{job['metadata']['name']}.log").write_text(result.stdout + result.stderr)
            if result.returncode != 0:
                raise StartupError(f"migration {job['metadata']['name']} failed:\n{result.stderr[-2000:]}")

    def start_services(self) -> list[Workload]:
        deployments = [d for d in self.rendered("emporium", NAMESPACE) if d["kind"] == "Deployment"]
        addresses = self._addresses(deployments)
        workloads = [self.workload(d, NAMESPACE, addresses) for d in deployments]
        for w in workloads:
            if not w.process.running():
                w.process.start()
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

    def admin_token(self) -> str:
        data = self._reader()("Secret", NAMESPACE, "users-admin")
        body = {"email": data["ADMIN_EMAIL"].decode(), "password": data["ADMIN_PASSWORD"].decode()}
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
        started = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.servers.up()
        self.install_crds()
        self.apply_servers()
        self.install_charts()
        self.start_operator()
        self.wait_for_resources()
        self.run_migrations()
        workloads = self.start_services()
        self.register_endpoints(workloads)
        self.ingress.start()
        self.wait_for_ingress()
        self.write_admin_env()
        self.load_sample_catalog()
        print(f"Emporium is up ({time.monotonic() - started:.0f} s).")
        print(f"  ingress: {self.ingress.url}  (try {self.ingress.url}/products)")
        print(f"  export KUBECONFIG={self.kubeconfig}")
        for w in workloads:
            print(f"  {w.name:14} http://127.0.0.1:{w.container.port}")
        print(f"  admin credentials: {self.root / 'admin.env'}")
        print(f"  logs: {self.logs}")

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
            process = ManagedProcess(pid_file.stem, [], self.logs / "status.log", pid_path=pid_file)
            name = pid_file.stem.split("-", 1)[1]
            port = ports.get(f"{name}/http")
            rows.append((pid_file.stem, process.running(), f"http://127.0.0.1:{port}" if port else ""))
        return rows


def _third_party_ready(schemas: dict) -> bool:
    return all(Path(p).exists() for p in _safe_list(schemas["third_party_crd_files"]))


def _safe_list(function) -> list:
    try:
        return list(function())
    except Exception:
        return []


def _secret(name: str, data: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "type": "Opaque",
        "stringData": data,
    }


def _python(argv: list[str]) -> list[str]:
    """Containers run `python -m ...`: here that is this environment's interpreter; `kopf` likewise."""
    if argv and argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    if argv and argv[0] == "kopf":
        return [sys.executable, "-m", "kopf", *argv[1:]]
    return argv


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
        platform.up()
        return 0
    if args.command == "down":
        platform.down()
    rows = platform.status()
    for name, running, detail in rows:
        print(f"{name:24} {'running' if running else 'stopped':8} {detail}")
    return 0 if args.command == "down" or all(r for _, r, _ in rows) else 3


if __name__ == "__main__":
    raise SystemExit(main())
