"""Monitoring and tracing on kind (the session's kind cluster, tests/e2e/conftest.py): the Prometheus that
prometheus-operator runs there (both built here, tools/kind/deploy.sh) scrapes what the charts'
ServiceMonitors and PodMonitors select (the services through their sidecars, the operator, the ingress
gateway's Envoy), every target up, and has loaded the emporium chart's PrometheusRule; an order placed
through the ingress is one trace in the cluster's Jaeger, from the gateway through orders and products to
the notifications consumer.

Prometheus and Jaeger are reached through the API server's service proxy (no port-forward, no host port).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import httpx
import pytest
import yaml
from emporium_testbed.ingress import GATEWAY_PORT
from emporium_testbed.kind import REPO_ROOT, KindError, KindPlatform

from .traces import assert_one_complete_trace

GATEWAY = f"http://127.0.0.1:{GATEWAY_PORT}"
RULES = REPO_ROOT / "charts" / "emporium" / "rules" / "emporium-alerts.yaml"
PROMETHEUS = "/api/v1/namespaces/monitoring/services/http:prometheus-operated:web/proxy"
JAEGER = "/api/v1/namespaces/observability/services/http:jaeger:http-query/proxy"
pytestmark = pytest.mark.timeout(900)


def prometheus(cluster: KindPlatform, path: str) -> dict:
    body = json.loads(cluster.kubectl("get", "--raw", f"{PROMETHEUS}{path}"))
    assert body["status"] == "success", body
    return body["data"]


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(duration[:-1]) * units[duration[-1]]


def test_kind_prometheus_scrapes_our_targets_and_loads_the_charts_rules(kind_cluster: KindPlatform) -> None:
    chart = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    expected = {
        "users",
        "products",
        "orders",
        "notifications",
        "emporium-system/emporium-operator",
        "istio-system/emporium-ingressgateway",
    }
    # the monitors' interval is 30 s: a target is "unknown" until its first scrape, a rule until its group's
    # first evaluation. A service's target is "up" as soon as its sidecar answers; the app's own series join
    # the merged scrape only once the app listens (a pod restarted by an earlier test: one interval later).
    deadline = time.monotonic() + 240
    targets: list[dict] = []
    loaded: dict[str, dict] = {}
    app: list[dict] = []
    apps = {"users", "products", "orders", "notifications"}
    while time.monotonic() < deadline:
        with contextlib.suppress(KindError, ValueError):
            targets = prometheus(kind_cluster, "/api/v1/targets")["activeTargets"]
            groups = prometheus(kind_cluster, "/api/v1/rules")["groups"]
            loaded = {r["name"]: r for g in groups for r in g["rules"]}
            app = prometheus(kind_cluster, "/api/v1/query?query=" + "count+by+(job)+(python_info)")["result"]
        jobs = {t["labels"]["job"] for t in targets}
        if (
            jobs >= expected
            and all(t["health"] == "up" for t in targets)
            and {r["metric"]["job"] for r in app} >= apps
            and set(loaded) >= set(chart)
            and all(r["health"] != "unknown" for r in loaded.values())
        ):
            break
        time.sleep(5)
    jobs = {t["labels"]["job"] for t in targets}
    assert jobs >= expected, sorted(jobs)
    assert all(t["health"] == "up" for t in targets), [
        (t["labels"]["job"], t["scrapeUrl"], t["lastError"]) for t in targets if t["health"] != "up"
    ]
    # the services through their sidecars' merged endpoint (mesh on): the app's own series are in it
    assert {r["metric"]["job"] for r in app} >= apps, app
    assert set(loaded) == set(chart), sorted(set(loaded) ^ set(chart))
    for name, rule in chart.items():
        assert loaded[name]["annotations"] == rule["annotations"], name
        assert loaded[name]["labels"] == rule["labels"], name
        assert loaded[name]["duration"] == (_seconds(rule["for"]) if "for" in rule else 0), name
        assert loaded[name]["health"] == "ok", loaded[name]


def _order_through_the_ingress(cluster: KindPlatform) -> str:
    """Places an order through the ingress (a new customer, a new product of the admin's) and returns the
    request id the gateway gave it."""
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:
        admin = cluster.admin_env()
        credentials = {"email": admin["ADMIN_EMAIL"], "password": admin["ADMIN_PASSWORD"]}
        login = http.post("/users/login", json=credentials)
        assert login.status_code == 200, login.text
        product = http.post(
            "/products",
            json={
                "name": "Trace test product",
                "price": "1.00",
                "stock_quantity": 10,
                "sku": f"TRACE-{uuid.uuid4().hex[:12]}",
                "category": "test",
            },
            headers={"Authorization": f"Bearer {login.json()['access_token']}"},
        )
        assert product.status_code == 201, product.text
        name = f"t{uuid.uuid4().hex[:10]}"
        body = {"email": f"{name}@example.com", "username": name, "password": "a long enough password"}
        assert http.post("/users/register", json=body).status_code == 201
        token = http.post("/users/login", json={"email": body["email"], "password": body["password"]})
        assert token.status_code == 200, token.text
        order = http.post(
            "/orders",
            json={"items": [{"product_id": product.json()["id"], "quantity": 1}]},
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
        )
        assert order.status_code == 201, order.text
        return order.headers["x-request-id"]


def _log_entries(cluster: KindPlatform, deployment: str) -> list[dict]:
    out = cluster.kubectl("logs", "-n", "emporium", f"deploy/{deployment}", "-c", deployment, "--since=15m")
    entries = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def test_kind_one_trace_from_the_gateway_to_the_notifications_consumer(kind_cluster: KindPlatform) -> None:
    """The ingress gateway's Envoy starts the trace (Istio's OpenTelemetry provider -> the collector), orders
    and products continue it over HTTP, the outbox relay's publish and the notifications consumer over
    RabbitMQ, then the email send to mailpit: one trace in Jaeger, rooted at the gateway."""
    request_id = _order_through_the_ingress(kind_cluster)
    deadline = time.monotonic() + 60
    trace_ids: set[str] = set()
    while time.monotonic() < deadline and not trace_ids:
        trace_ids = {
            e["trace_id"]
            for e in _log_entries(kind_cluster, "orders")
            if e.get("request_id") == request_id and e.get("trace_id")
        }
        time.sleep(1)
    assert len(trace_ids) == 1, f"orders logged no single trace id for request {request_id}"
    (trace_id,) = trace_ids

    def fetch(trace: str) -> str:
        return kind_cluster.kubectl("get", "--raw", f"{JAEGER}/api/traces/{trace}")

    assert_one_complete_trace(fetch, trace_id, timeout=120, interval=3)
