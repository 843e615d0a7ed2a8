"""A Kubernetes control plane without nodes: etcd, kube-apiserver and kube-controller-manager as local
processes. Everything the API server does (CRD validation with CEL, admission, server-side apply, RBAC,
TokenRequest) is real; the controller manager adds garbage collection, namespace deletion, service
accounts and EndpointSlices. No kubelet runs, so pods are never scheduled."""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .pki import LocalPKI
from .process import ManagedProcess, free_port
from .toolchain import tool

CONTROLLERS = ",".join(
    [
        "garbage-collector-controller",
        "namespace-controller",
        "serviceaccount-controller",
        "serviceaccount-token-controller",
        "endpointslice-controller",
        "endpointslice-mirroring-controller",
        "root-ca-certificate-publisher-controller",
        "clusterrole-aggregation-controller",
    ]
)


@dataclass
class ControlPlane:
    base_dir: Path
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    apiserver_port: int = field(default_factory=free_port)
    controller_manager_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    kubeconfig: Path | None = None  # default: base_dir/kubeconfig
    log_dir: Path | None = None  # default: base_dir/logs

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        self.pki = LocalPKI(self.base_dir / "pki")
        self.kubeconfig = Path(self.kubeconfig or self.base_dir / "kubeconfig")
        self.logs = Path(self.log_dir or self.base_dir / "logs")
        self.etcd: ManagedProcess | None = None
        self.apiserver: ManagedProcess | None = None
        self.controller_manager: ManagedProcess | None = None

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.apiserver_port}"

    def processes(self) -> list[ManagedProcess]:
        self._define()
        return [p for p in (self.controller_manager, self.apiserver, self.etcd) if p]

    def _define(self) -> None:
        if self.etcd:
            return
        pki = self.pki.path
        etcd_url = f"http://{self.host}:{self.etcd_port}"
        peer_url = f"http://{self.host}:{self.etcd_peer_port}"
        self.etcd = ManagedProcess(
            "etcd",
            [
                tool("etcd"),
                "--name=emporium",
                f"--data-dir={self.base_dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=emporium={peer_url}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",  # throwaway state; fsync only slows tests
                "--log-level=warn",
            ],
            self.logs / "etcd.log",
            pid_path=self.base_dir / "etcd.pid",
        )
        self.apiserver = ManagedProcess(
            "kube-apiserver",
            [
                tool("kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={self.host}",
                f"--advertise-address={self.host}",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={pki('apiserver.crt')}",
                f"--tls-private-key-file={pki('apiserver.key')}",
                f"--client-ca-file={pki('ca.crt')}",
                f"--service-account-key-file={pki('sa.pub')}",
                f"--service-account-signing-key-file={pki('sa.key')}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                f"--cert-dir={self.base_dir / 'apiserver-certs'}",
                "--v=1",
            ],
            self.logs / "kube-apiserver.log",
            pid_path=self.base_dir / "kube-apiserver.pid",
        )
        self.controller_manager = ManagedProcess(
            "kube-controller-manager",
            [
                tool("kube-controller-manager"),
                f"--kubeconfig={self.base_dir / 'kube-controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={self.base_dir / 'kube-controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={self.base_dir / 'kube-controller-manager.kubeconfig'}",
                f"--bind-address={self.host}",
                f"--secure-port={self.controller_manager_port}",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={pki('sa.key')}",
                f"--root-ca-file={pki('ca.crt')}",
                # Each controller runs as its own service account with the bootstrap RBAC roles,
                # as in a real cluster.
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
            self.logs / "kube-controller-manager.log",
            pid_path=self.base_dir / "kube-controller-manager.pid",
        )

    def _write_kubeconfig(self, path: Path, user: str) -> None:
        def b64(name: str) -> str:
            return base64.b64encode(self.pki.path(name).read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "emporium",
                    "cluster": {"server": self.server, "certificate-authority-data": b64("ca.crt")},
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(f"{user}.crt"),
                        "client-key-data": b64(f"{user}.key"),
                    },
                }
            ],
            "contexts": [{"name": "emporium", "context": {"cluster": "emporium", "user": user}}],
            "current-context": "emporium",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def start(self, timeout: float = 90, wait_for_controllers: bool = True) -> ControlPlane:
        """Start etcd, the API server and the controller manager; return once the API server is ready
        and, unless ``wait_for_controllers`` is False, the controller manager too (callers that need no
        controller right away save its start-up time)."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.pki.ensure()
        self._define()
        self._write_kubeconfig(self.kubeconfig, "admin")
        self._write_kubeconfig(
            self.base_dir / "kube-controller-manager.kubeconfig", "kube-controller-manager"
        )
        assert self.etcd and self.apiserver and self.controller_manager
        try:
            self._start_processes(timeout, wait_for_controllers)
        except BaseException:
            self.stop()  # nothing half-started is left behind
            raise
        return self

    def _start_processes(self, timeout: float, wait_for_controllers: bool) -> None:
        assert self.etcd and self.apiserver and self.controller_manager
        self.etcd.start()
        self.etcd.wait_ready(lambda: self._http_ok(f"http://{self.host}:{self.etcd_port}/health"), timeout)
        self.apiserver.start()
        self.apiserver.wait_ready(lambda: self._https_ok("/readyz"), timeout)
        self.controller_manager.start()
        if wait_for_controllers:
            self.wait_for_controllers(timeout)

    def wait_for_controllers(self, timeout: float = 90) -> None:
        assert self.controller_manager
        self.controller_manager.wait_ready(
            lambda: self._https_ok("/healthz", port=self.controller_manager_port, client_cert=False), timeout
        )

    def stop(self) -> None:
        for process in self.processes():
            process.stop()

    def running(self) -> bool:
        return all(p.running() for p in self.processes())

    def ssl_context(self, client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.path("ca.crt")))
        if client_cert:
            context.load_cert_chain(self.pki.path("admin.crt"), self.pki.path("admin.key"))
        return context

    @staticmethod
    def _http_ok(url: str) -> bool:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200

    def _https_ok(self, path: str, port: int | None = None, client_cert: bool = True) -> bool:
        url = f"https://{self.host}:{port or self.apiserver_port}{path}"
        context = self.ssl_context(client_cert)
        if port is not None:
            # kube-controller-manager serves a self-signed certificate of its own.
            context = ssl._create_unverified_context()  # noqa: S323
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200

    def get(self, path: str, accept: str = "application/json") -> bytes:
        """GET an API path as the admin (for smoke checks without a client library)."""
        request = urllib.request.Request(self.server + path, headers={"Accept": accept})
        for attempt in range(20):
            try:
                with urllib.request.urlopen(request, timeout=10, context=self.ssl_context()) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                # A server that has just started answers 429 until its priority-and-fairness
                # configuration is in place (client-go retries it too; a local server is asked again sooner).
                if error.code != 429 or attempt == 19:
                    raise
                time.sleep(min(float(error.headers.get("Retry-After") or 1), 0.25))
        raise AssertionError("unreachable")

    def list_metadata(self, path: str) -> list[dict]:
        """The metadata of every object of a list path (the server leaves out specs and statuses)."""
        accept = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
        return [item["metadata"] for item in json.loads(self.get(path, accept))["items"]]
