"""Monitoring: the alert rules pass promtool (check + unit tests), and every metric the dashboards and
the alerts query is one the running services and operator really export on /metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from emporium_testbed.process import free_port

from .conftest import CHARTS, SERVICES, run

RULES = CHARTS / "emporium" / "rules" / "emporium-alerts.yaml"
DASHBOARDS = sorted((CHARTS / "emporium" / "dashboards").glob("*.json"))
PROMTOOL_TESTS = Path(__file__).parent / "promtool" / "emporium-alerts.test.yaml"
METRIC = re.compile(r"\b(emporium_[a-z0-9_]+)")


def promtool() -> str:
    return "promtool"


def test_promtool_check_rules() -> None:
    out = run([promtool(), "check", "rules", str(RULES)]).stdout
    assert "SUCCESS" in out


def test_promtool_check_rendered_prometheus_rule(render, tmp_path: Path) -> None:
    """The PrometheusRule the chart renders is a valid rule file too (templating did not alter it)."""
    (rule,) = [o for o in render("emporium") if o["kind"] == "PrometheusRule"]
    path = tmp_path / "rendered-rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    assert "SUCCESS" in run([promtool(), "check", "rules", str(path)]).stdout


def test_promtool_test_rules() -> None:
    out = run([promtool(), "test", "rules", str(PROMTOOL_TESTS)]).stdout
    assert "SUCCESS" in out


def test_every_alert_has_a_promtool_case() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {
        case["alertname"]
        for test in yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert alerts == tested


RUNBOOKS = CHARTS.parent / "docs" / "runbooks.md"


def test_every_alert_links_its_runbook_section() -> None:
    """runbook_url of every alert is docs/runbooks.md#<its name>, and that section exists."""
    headings = {
        line[3:].strip().lower() for line in RUNBOOKS.read_text().splitlines() if line.startswith("## ")
    }
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"].get("runbook_url", "")
            assert url == f"docs/runbooks.md#{rule['alert'].lower()}", rule["alert"]
            assert rule["alert"].lower() in headings, f"docs/runbooks.md has no section {rule['alert']}"


def _exprs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _exprs(value)


def queried_metrics() -> dict[str, set[str]]:
    """Source file -> the emporium_* metric names its queries use."""
    found = {}
    for path in DASHBOARDS:
        found[path.name] = {m for e in _exprs(json.loads(path.read_text())) for m in METRIC.findall(e)}
    found[RULES.name] = {m for e in _exprs(yaml.safe_load(RULES.read_text())) for m in METRIC.findall(e)}
    return found


def exported_names(exposition: str) -> set[str]:
    """Every sample name a /metrics page can carry (a metric with no samples yet still has its TYPE)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _get(url: str, timeout: float = 2) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            return _get(url)
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def live_metrics(postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """/metrics of each service (`python -m emporium_<svc> serve`) and of the operator's metrics
    endpoint, started as processes the way the containers start them."""
    base = tmp_path_factory.mktemp("live-metrics")
    procs: list[subprocess.Popen] = []
    pages: dict[str, str] = {}
    try:
        started = {}
        for svc in SERVICES:
            port = free_port()
            dbname = f"metrics_{svc}"
            postgres.create_database(dbname)
            env = {
                **os.environ,
                "PORT": str(port),
                "ENVIRONMENT": "local",
                "LOG_LEVEL": "WARNING",
                "DATABASE_URL": postgres.dsn(dbname),
                "JWT_KEYS_DIR": str(base / "jwt-keys"),
                "INTERNAL_TOKEN": "metrics-test-internal-token",
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(free_port()),
            }
            env.pop("AMQP_URL", None)
            log = base / f"{svc}.log"
            proc = subprocess.Popen(
                [sys.executable, "-m", f"emporium_{svc}", "serve"],
                env=env,
                cwd=base,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
            )
            procs.append(proc)
            started[svc] = (port, proc, log)
        port = free_port()
        log = base / "operator.log"
        operator = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time\nfrom emporium_operator import metrics\nmetrics.serve()\ntime.sleep(3600)",
            ],
            env={**os.environ, "METRICS_PORT": str(port), "METRICS_ADDR": "127.0.0.1"},
            cwd=base,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(operator)
        started["operator"] = (port, operator, log)
        for name, (port, proc, log) in started.items():
            if name != "operator":  # one real request, so the request metrics carry samples
                _wait_for(f"http://127.0.0.1:{port}/healthz", proc, log)
            pages[name] = _wait_for(f"http://127.0.0.1:{port}/metrics", proc, log)
        yield pages
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_queried_metrics_are_exported(live_metrics: dict[str, str]) -> None:
    exported = set().union(*(exported_names(page) for page in live_metrics.values()))
    assert "emporium_http_requests_total" in exported_names(live_metrics["products"])
    assert "emporium_operator_reconcile_total" in exported_names(live_metrics["operator"])
    queried = queried_metrics()
    # every dashboard queries something; the gateway's only Envoy's metrics (the e2e test runs them all)
    assert all(list(_exprs(json.loads(path.read_text()))) for path in DASHBOARDS)
    assert all(names for source, names in queried.items() if source != "emporium-gateway.json")
    for source, names in queried.items():
        missing = sorted(names - exported)
        assert not missing, f"{source} queries metrics no running component exports: {missing}"


def _model_diff(original: object, round_trip: object, path: str = "") -> list[str]:
    """Where the dashboard says something Grafana's model does not carry (unknown or misspelled keys)
    or carries differently (a value of another type)."""
    if isinstance(original, dict):
        if not isinstance(round_trip, dict):
            return [f"{path or '.'}: not an object in the model"]
        found = []
        for key, value in original.items():
            if key not in round_trip:
                found.append(f"{path}.{key}: not in Grafana's dashboard model")
            else:
                found += _model_diff(value, round_trip[key], f"{path}.{key}")
        return found
    if isinstance(original, list):
        if not isinstance(round_trip, list) or len(original) != len(round_trip):
            return [f"{path}: list changed in the model"]
        return [
            d
            for i, pair in enumerate(zip(original, round_trip, strict=True))
            for d in _model_diff(*pair, f"{path}[{i}]")
        ]
    return [] if original == round_trip else [f"{path}: {original!r} became {round_trip!r}"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_matches_grafanas_dashboard_model(path: Path) -> None:
    """Each dashboard survives a round trip through grafana-foundation-sdk's Dashboard model (Grafana's
    schema, generated from its CUE definitions) unchanged, and is complete: uid, Prometheus targets with
    a refId and an expression, every panel placed on the grid."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard
    from grafana_foundation_sdk.models.prometheus import Dataquery

    register_default_plugins()  # panel and query types: the Prometheus query model checks the targets
    original = json.loads(path.read_text())
    model = Dashboard.from_json(original)
    round_trip = json.loads(JSONEncoder(sort_keys=True).encode(model))
    assert not _model_diff(original, round_trip), _model_diff(original, round_trip)
    assert original["uid"] == path.stem and original["title"].startswith("Emporium / ")
    ids = [panel["id"] for panel in original["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in model.panels:
        assert panel.grid_pos is not None and panel.targets, panel.title
        for target in panel.targets:
            assert isinstance(target, Dataquery) and target.ref_id and target.expr, panel.title


def test_local_prometheus_scrapes_what_the_charts_monitors_select(render, tmp_path: Path) -> None:
    """`make up`'s Prometheus configuration: every ServiceMonitor and PodMonitor the charts render becomes a
    target with prometheus-operator's job label, plus RabbitMQ and postgres_exporter; the rule file is the
    rendered PrometheusRule; promtool accepts the configuration with its rules."""
    from emporium_testbed.observability import LocalObservability, rule_groups
    from emporium_testbed.toolchain import REPO_ROOT

    emporium = render("emporium", "-f", str(REPO_ROOT / "k8s" / "values" / "local.yaml"))
    operator = render("emporium-operator")
    for docs, namespace in ((emporium, "emporium"), (operator, "emporium-system")):
        for doc in docs:
            doc["metadata"].setdefault("namespace", namespace)
    monitors = [d for d in emporium + operator if d["kind"] in ("ServiceMonitor", "PodMonitor")]
    ports = {
        f"{m['metadata']['name']}/{e['port']}": free_port()
        for m in monitors
        for e in m["spec"].get("endpoints", []) + m["spec"].get("podMetricsEndpoints", [])
    }
    obs = LocalObservability(tmp_path / "local")
    obs.servers.rabbitmq.prometheus_port = free_port()
    obs.write_config(monitors, ports, rule_groups(emporium))
    config = yaml.safe_load(obs.config_path.read_text())
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    assert jobs >= {
        *SERVICES,
        "emporium-system/emporium-operator",
        "istio-system/emporium-ingressgateway",
        "rabbitmq",
        "postgres",
    }, jobs
    gateway = next(c for c in config["scrape_configs"] if c["job_name"].endswith("ingressgateway"))
    assert gateway["metrics_path"] == "/stats/prometheus"
    assert gateway["static_configs"][0]["targets"] == ["127.0.0.1:15090"]
    rules = yaml.safe_load((obs.rules_dir / "emporium.yaml").read_text())
    assert rules == yaml.safe_load(RULES.read_text())
    assert "SUCCESS" in run([promtool(), "check", "config", str(obs.config_path)]).stdout
