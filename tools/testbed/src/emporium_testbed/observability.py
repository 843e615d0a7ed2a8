"""Observability of the local platform: a real Prometheus that scrapes what the charts' ServiceMonitors and
PodMonitor select (the four services, the operator), the ingress gateway's Envoy, RabbitMQ (its
``rabbitmq_prometheus`` plugin) and Postgres (``postgres_exporter``), and evaluates the alert rules of the
chart's PrometheusRule as Helm rendered them into the API server.

Scrape targets get the labels prometheus-operator gives a ServiceMonitor's targets (``job`` = the Service,
``namespace``, ``service``, ``pod``, ``container``, ``endpoint``; a PodMonitor's job is
``<namespace>/<name>``), so the dashboards and alerts read the same series here as on a cluster.

Ports are chosen once and kept in ``<root>/observability/ports.json``; data lives in
``<root>/observability``; logs in ``<root>/logs``.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import yaml

from .local import LocalServers
from .process import ManagedProcess, StartupError, free_port

PROMETHEUS_BIN = "/usr/bin/prometheus"  # Debian's prometheus (the package that also brings promtool)
GATEWAY_STATS_PORT = 15090  # the gateway Envoy's Prometheus listener (pilot-agent's bootstrap)
GATEWAY_STATS_PORT_NAME = "http-envoy-prom"  # its container port's name in Istio's gateway pods
GATEWAY_NAMESPACE = "istio-system"
# Scrape and rule evaluation interval of the local Prometheus (the charts' monitors say 30 s; locally a
# shorter one makes `make up` show data sooner at no real cost).
DEFAULT_INTERVAL = "10s"


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (PROMETHEUS_BIN if Path(PROMETHEUS_BIN).exists() else None)
    if not found:
        raise FileNotFoundError("Prometheus not found: install Debian's prometheus (make deps does this)")
    return found


@dataclass
class Target:
    """One static scrape target with the labels prometheus-operator would give it."""

    job: str
    address: str
    path: str
    labels: dict[str, str]
    honor_labels: bool = False


def monitor_targets(monitors: list[dict], ports: dict[str, int]) -> list[Target]:
    """Static targets for the chart's ServiceMonitors and PodMonitors: ``ports`` maps
    ``<workload>/<container port name>`` to the local port of the process that replaces the pod."""
    targets = []
    for monitor in monitors:
        meta = monitor["metadata"]
        name, namespace = meta["name"], meta.get("namespace", "")
        if monitor["kind"] == "ServiceMonitor":
            endpoints, job = monitor["spec"].get("endpoints", []), name
        elif monitor["kind"] == "PodMonitor":
            endpoints, job = monitor["spec"].get("podMetricsEndpoints", []), f"{namespace}/{name}"
        else:
            continue
        for endpoint in endpoints:
            port = ports.get(f"{name}/{endpoint.get('port')}")
            if port is None:
                continue  # nothing runs locally behind that port (e.g. the mesh's merged endpoint)
            labels = {"namespace": namespace, "pod": f"{name}-local", "container": name}
            labels["endpoint"] = str(endpoint.get("port"))
            if monitor["kind"] == "ServiceMonitor":
                labels["service"] = name
            targets.append(
                Target(
                    job=job,
                    address=f"127.0.0.1:{port}",
                    path=endpoint.get("path", "/metrics"),
                    labels=labels,
                    honor_labels=bool(endpoint.get("honorLabels", False)),
                )
            )
    return targets


def prometheus_config(targets: list[Target], interval: str, rule_files: list[str]) -> dict:
    jobs: dict[tuple[str, str, bool], list[Target]] = {}
    for t in targets:
        jobs.setdefault((t.job, t.path, t.honor_labels), []).append(t)
    scrape_configs = []
    for (job, path, honor), members in jobs.items():
        config = {
            "job_name": job,
            "metrics_path": path,
            "static_configs": [{"targets": [t.address], "labels": t.labels} for t in members],
        }
        if honor:
            config["honor_labels"] = True
        scrape_configs.append(config)
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval if _seconds(interval) <= 10 else "10s",
            "evaluation_interval": interval,
            "external_labels": {"cluster": "local"},
        },
        "rule_files": rule_files,
        "scrape_configs": scrape_configs,
    }


def rule_groups(manifests: list[dict]) -> list[dict]:
    """The rule groups of every PrometheusRule among a release's rendered objects."""
    groups = []
    for doc in manifests:
        if doc.get("kind") == "PrometheusRule":
            groups += doc["spec"].get("groups", [])
    return groups


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for unit in ("ms", "s", "m", "h", "d"):
        if duration.endswith(unit) and duration[: -len(unit)].replace(".", "", 1).isdigit():
            return float(duration[: -len(unit)]) * units[unit]
    raise ValueError(f"not a duration: {duration!r}")


class LocalObservability:
    """Prometheus and postgres_exporter of one local platform under root."""

    def __init__(self, root: Path, servers: LocalServers | None = None) -> None:
        self.root = Path(root)
        self.servers = servers or LocalServers(self.root)
        self.home = self.root / "observability"
        self.logs = self.servers.logs
        self.run_dir = self.root / "run"
        self.ports_path = self.home / "ports.json"
        self.config_path = self.home / "prometheus.yml"
        self.rules_dir = self.home / "rules"
        self.prometheus = ManagedProcess(
            "prometheus",
            [],
            self.logs / "prometheus.log",
            pid_path=self.run_dir / "observability-prometheus.pid",
        )
        self.postgres_exporter = ManagedProcess(
            "postgres-exporter",
            [],
            self.logs / "postgres-exporter.log",
            pid_path=self.run_dir / "observability-postgres-exporter.pid",
        )

    # -- ports -----------------------------------------------------------------------------------------

    def port(self, key: str) -> int:
        ports = json.loads(self.ports_path.read_text()) if self.ports_path.exists() else {}
        if key not in ports:
            ports[key] = free_port()
            self.home.mkdir(parents=True, exist_ok=True)
            self.ports_path.write_text(json.dumps(ports, indent=2))
        return ports[key]

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.port('prometheus')}"

    # -- configuration ---------------------------------------------------------------------------------

    def infrastructure_targets(self) -> list[Target]:
        rabbit = self.servers.rabbitmq
        targets = [
            Target(
                "postgres",
                f"127.0.0.1:{self.port('postgres-exporter')}",
                "/metrics",
                {"namespace": "local", "pod": "postgres-local", "container": "postgres-exporter"},
            ),
        ]
        if rabbit.prometheus_port:
            targets.append(
                Target(
                    "rabbitmq",
                    f"127.0.0.1:{rabbit.prometheus_port}",
                    "/metrics",
                    {"namespace": "local", "pod": "rabbitmq-local", "container": "rabbitmq"},
                )
            )
        return targets

    def write_config(
        self,
        monitors: list[dict],
        ports: dict[str, int],
        groups: list[dict],
        interval: str = DEFAULT_INTERVAL,
    ) -> None:
        """prometheus.yml (targets from the monitors plus the infrastructure) and the rule file."""
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        self.write_rules(groups)
        # the chart's PodMonitor of the ingress gateway: here the local gateway's Envoy stats listener
        gateway = {
            f"{m['metadata']['name']}/{GATEWAY_STATS_PORT_NAME}": GATEWAY_STATS_PORT
            for m in monitors
            if m["kind"] == "PodMonitor" and m["metadata"].get("namespace") == GATEWAY_NAMESPACE
        }
        targets = monitor_targets(monitors, {**ports, **gateway}) + self.infrastructure_targets()
        config = prometheus_config(targets, interval, [str(self.rules_dir / "*.yaml")])
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def write_rules(self, groups: list[dict]) -> None:
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        (self.rules_dir / "emporium.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))

    def set_interval(self, interval: str) -> None:
        """Change the scrape and evaluation interval of the written configuration (call reload())."""
        config = yaml.safe_load(self.config_path.read_text())
        config["global"].update(
            scrape_interval=interval,
            evaluation_interval=interval,
            scrape_timeout=interval if _seconds(interval) <= 10 else "10s",
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def reload(self) -> None:
        """Make the running Prometheus read its configuration and rules again."""
        request = urllib.request.Request(f"{self.prometheus_url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 200:
                raise StartupError(f"Prometheus reload answered {response.status}")

    # -- processes -------------------------------------------------------------------------------------

    def _postgres_exporter_argv(self) -> tuple[list[str], dict[str, str]]:
        from .toolchain import tool

        pg = self.servers.postgres
        dsn = (
            f"postgresql://{quote(pg.superuser, safe='')}:{quote(pg.password, safe='')}"
            f"@{pg.host}:{pg.port}/postgres?sslmode=disable"
        )
        argv = [
            tool("postgres_exporter"),
            f"--web.listen-address=127.0.0.1:{self.port('postgres-exporter')}",
            "--no-collector.wal",  # needs pg_ls_waldir(): superuser-only file access we do not need
        ]
        return argv, {"DATA_SOURCE_NAME": dsn}

    def start(self, monitors: list[dict], ports: dict[str, int], groups: list[dict]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.write_config(monitors, ports, groups)
        if not self.postgres_exporter.running():
            self.postgres_exporter.argv, self.postgres_exporter.env = self._postgres_exporter_argv()
            self.postgres_exporter.start()
        if not self.prometheus.running():
            data = self.home / "prometheus-data"
            data.mkdir(parents=True, exist_ok=True)
            self.prometheus.argv = [
                prometheus_binary(),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={data}",
                "--storage.tsdb.retention.time=3d",
                f"--web.listen-address=127.0.0.1:{self.port('prometheus')}",
                "--web.enable-lifecycle",  # POST /-/reload after `make up` rewrote the config
                f"--web.external-url={self.prometheus_url}",
            ]
            self.prometheus.start()
            self.prometheus.wait_ready(lambda: _http_ok(f"{self.prometheus_url}/-/ready"), 60)
        else:
            self.reload()
        self.postgres_exporter.wait_ready(
            lambda: _http_ok(f"http://127.0.0.1:{self.port('postgres-exporter')}/metrics"), 30
        )

    def stop(self) -> None:
        self.prometheus.stop()
        self.postgres_exporter.stop()

    def status(self) -> list[tuple[str, bool, str]]:
        return [
            ("prometheus", self.prometheus.running(), self.prometheus_url),
            (
                "postgres-exporter",
                self.postgres_exporter.running(),
                f"http://127.0.0.1:{self.port('postgres-exporter')}/metrics",
            ),
        ]

    # -- queries ---------------------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> dict:
        from urllib.parse import urlencode

        url = f"{self.prometheus_url}{path}" + (f"?{urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path}: {body}")
        return body["data"]


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


class LocalTracing:
    """The trace pipeline of the local platform: the OpenTelemetry Collector (our minimal build: OTLP in,
    batch, OTLP out) in front of Jaeger (v2, in-memory store, query API and UI). The services and the
    ingress gateway's Envoy send OTLP to the collector; the collector forwards to Jaeger."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root = Path(root)
        self.home = self.root / "observability"
        self.logs = Path(logs)
        self.run_dir = self.root / "run"
        self.ports_path = self.home / "ports.json"
        self.collector = ManagedProcess(
            "otel-collector",
            [],
            self.logs / "otel-collector.log",
            pid_path=self.run_dir / "observability-otelcol.pid",
        )
        self.jaeger = ManagedProcess(
            "jaeger", [], self.logs / "jaeger.log", pid_path=self.run_dir / "observability-jaeger.pid"
        )

    def port(self, key: str) -> int:
        return LocalObservability.port(self, key)  # type: ignore[arg-type]

    @property
    def otlp_http(self) -> str:
        return f"http://127.0.0.1:{self.port('otlp-http')}"

    @property
    def jaeger_url(self) -> str:
        return f"http://127.0.0.1:{self.port('jaeger-ui')}"

    def collector_config(self) -> dict:
        return {
            "receivers": {
                "otlp": {
                    "protocols": {
                        "grpc": {"endpoint": f"127.0.0.1:{self.port('otlp-grpc')}"},
                        "http": {"endpoint": f"127.0.0.1:{self.port('otlp-http')}"},
                    }
                }
            },
            "processors": {"batch": {"timeout": "1s"}},
            "exporters": {
                "otlp_grpc": {
                    "endpoint": f"127.0.0.1:{self.port('jaeger-otlp-grpc')}",
                    "tls": {"insecure": True},
                }
            },
            "service": {
                "telemetry": {"metrics": {"level": "none"}, "traces": {"level": "none"}},
                "pipelines": {
                    "traces": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["otlp_grpc"]}
                },
            },
        }

    def jaeger_config(self) -> dict:
        return {
            "service": {
                "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
                "pipelines": {
                    "traces": {
                        "receivers": ["otlp"],
                        "processors": ["batch"],
                        "exporters": ["jaeger_storage_exporter"],
                    }
                },
                "telemetry": {
                    "resource": {"service.name": "jaeger"},
                    "metrics": {"level": "none"},
                    "traces": {"level": "none"},
                },
            },
            "extensions": {
                "healthcheckv2": {
                    "use_v2": True,
                    "http": {"endpoint": f"127.0.0.1:{self.port('jaeger-health')}"},
                },
                "jaeger_query": {
                    "storage": {"traces": "memstore"},
                    "enable_tracing": False,  # no traces of its own (they would go to 127.0.0.1:4317)
                    "http": {"endpoint": f"127.0.0.1:{self.port('jaeger-ui')}"},
                    "grpc": {"endpoint": f"127.0.0.1:{self.port('jaeger-query-grpc')}"},
                },
                "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": 20000}}}},
            },
            "receivers": {
                "otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{self.port('jaeger-otlp-grpc')}"}}}
            },
            "processors": {"batch": {"timeout": "1s"}},
            "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
        }

    def start(self) -> None:
        from .toolchain import tool

        self.home.mkdir(parents=True, exist_ok=True)
        for name, config in (("jaeger", self.jaeger_config()), ("otelcol", self.collector_config())):
            (self.home / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if not self.jaeger.running():
            self.jaeger.argv = [tool("jaeger"), f"--config={self.home / 'jaeger.yaml'}"]
            self.jaeger.start()
        self.jaeger.wait_ready(lambda: _http_ok(f"{self.jaeger_url}/api/services"), 60)
        if not self.collector.running():
            self.collector.argv = [tool("otelcol"), f"--config={self.home / 'otelcol.yaml'}"]
            self.collector.start()
        self.collector.wait_ready(lambda: _port_open(self.port("otlp-http")), 60)

    def stop(self) -> None:
        self.collector.stop()
        self.jaeger.stop()

    def status(self) -> list[tuple[str, bool, str]]:
        return [
            ("jaeger", self.jaeger.running(), self.jaeger_url),
            (
                "otel-collector",
                self.collector.running(),
                f"OTLP {self.otlp_http} (HTTP), 127.0.0.1:{self.port('otlp-grpc')} (gRPC)",
            ),
        ]


def _port_open(port: int) -> bool:
    from .process import port_open

    return port_open("127.0.0.1", port)
