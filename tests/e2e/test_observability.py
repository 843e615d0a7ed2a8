"""`make up`'s Prometheus, seen working: it scrapes every component, it evaluates the chart's own alert
rules, every dashboard panel returns data after a bounded load through the ingress, and every alert is made
to fire by a real fault and is seen firing in /api/v1/alerts, then resolving.

The faults: a service process stopped under load, poisoned messages on the notifications queue, a poisoned
row in an outbox, a queue deleted again and again behind the operator's back, an exclusive lock held on the
products table under load, the events exchange deleted while the operator is down, RabbitMQ frozen
(SIGSTOP). Independent faults run at the same time, in three rounds.

Time scale: the rules Prometheus evaluates here are the chart's rules as Helm rendered them (same
expressions, labels and annotations) with ``for:`` and range windows divided by 30 and clamped to 10-30 s,
the outbox age threshold (300 s) at 10 s and the backlog threshold (1000) at 2, and a 1 s scrape and
evaluation interval, so each round takes about a minute, not an hour. The operator runs with a 3 s drift
check and 2 s retries, and the orders reaper with a 30 s grace every 5 s (chart values, set by helm upgrade).

Traces: one order placed through the ingress is fetched from Jaeger's API as one trace from the gateway to
the email, and the services' log lines carry its trace id.

One module-scoped platform in a temporary root (fixed ingress ports: see test_local_platform.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from emporium_testbed.ingress import GATEWAY_PORT
from emporium_testbed.local import LocalServers
from emporium_testbed.observability import LocalObservability, rule_groups
from emporium_testbed.process import ManagedProcess, pid_alive, port_open
from emporium_testbed.toolchain import REPO_ROOT, tool

from .traces import assert_one_complete_trace

GATEWAY = f"http://127.0.0.1:{GATEWAY_PORT}"
CHARTS = REPO_ROOT / "charts"
RULES = CHARTS / "emporium" / "rules" / "emporium-alerts.yaml"
DASHBOARDS = sorted((CHARTS / "emporium" / "dashboards").glob("*.json"))
INTERVAL = "1s"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


# -- the platform ------------------------------------------------------------------------------------


def platform(root: Path, command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emporium_testbed.platform", command, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    assert not port_open("127.0.0.1", GATEWAY_PORT), "port 8080 is taken (is `make up` running? `make down`)"
    root = tmp_path_factory.mktemp("platform")
    for folder in (root, root.parent, root.parent.parent):
        folder.chmod(folder.stat().st_mode | 0o111)  # postgres and rabbitmq users traverse into it
    try:
        up = platform(root, "up")
        assert up.returncode == 0, f"make up failed:\n{up.stdout[-3000:]}\n{up.stderr[-5000:]}"
        assert re.search(r"^\s+prometheus\s+http://127\.0\.0\.1:\d+$", up.stdout, re.M), up.stdout
        status = platform(root, "status", timeout=120)
        assert re.search(r"^prometheus\s+running\s+http://127\.0\.0\.1:\d+$", status.stdout, re.M), (
            status.stdout
        )
        yield root
    finally:
        with contextlib.suppress(Exception):  # a test may have left RabbitMQ frozen
            _signal_group(LocalServers(root).rabbitmq.process, signal.SIGCONT)
        pids = [int(p.read_text()) for p in root.rglob("*.pid") if p.read_text().strip().isdigit()]
        down = platform(root, "down", timeout=300)
        assert down.returncode == 0, down.stderr
        alive = [pid for pid in pids if pid_alive(pid)]
        assert not alive, f"processes left after down: {alive}"


@pytest.fixture(scope="module")
def obs(local: Path) -> LocalObservability:
    return LocalObservability(local)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(base_url=GATEWAY, timeout=30) as client:
        yield client


def helm(root: Path, *args: str) -> str:
    result = subprocess.run(
        [tool("helm"), f"--kubeconfig={root / 'kubeconfig'}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def kubectl(root: Path, *args: str) -> str:
    result = subprocess.run(
        [tool("kubectl"), f"--kubeconfig={root / 'kubeconfig'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _signal_group(process: ManagedProcess, sig: signal.Signals) -> None:
    pid = process.pid
    assert pid is not None, f"{process.name} has no pid"
    os.killpg(pid, sig)


def workload(root: Path, name: str) -> ManagedProcess:
    return ManagedProcess(name, [], root / "logs" / "x.log", pid_path=root / "run" / f"deploy-{name}.pid")


def restart_workloads(root: Path) -> None:
    """What `make up` does for a workload process that is gone: start it from its chart again."""
    from emporium_testbed.platform import LocalPlatform

    lp = LocalPlatform(root)
    lp.start_operator()
    lp.start_services()


def secret(root: Path, name: str, key: str) -> str:
    import base64

    data = json.loads(kubectl(root, "get", "secret", name, "-n", "emporium", "-o", "json"))["data"]
    return base64.b64decode(data[key]).decode()


def psql(root: Path, database_secret: str, statement: str) -> None:
    """Run one statement as the service's own database user (its credentials Secret from the operator)."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(
            host=secret(root, database_secret, "host"),
            port=int(secret(root, database_secret, "port")),
            user=secret(root, database_secret, "username"),
            password=secret(root, database_secret, "password"),
            database=secret(root, database_secret, "dbname"),
        )
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


# -- Prometheus helpers ------------------------------------------------------------------------------


def alerts(obs: LocalObservability, name: str) -> list[dict]:
    return [a for a in obs.api("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name]


def wait_firing(
    obs: LocalObservability, name: str, timeout: float = 180, match: Callable[[dict], bool] = lambda _: True
) -> dict:
    deadline = time.monotonic() + timeout
    seen: list[dict] = []
    while time.monotonic() < deadline:
        seen = alerts(obs, name)
        firing = [a for a in seen if a["state"] == "firing" and match(a["labels"])]
        if firing:
            return firing[0]
        time.sleep(1)
    raise AssertionError(f"{name} did not fire in {timeout:.0f} s; last seen: {seen}")


def wait_resolved(obs: LocalObservability, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    seen: list[dict] = []
    while time.monotonic() < deadline:
        seen = alerts(obs, name)
        if not seen:
            return
        time.sleep(1)
    raise AssertionError(f"{name} did not resolve in {timeout:.0f} s; still: {seen}")


def _seconds(duration: str) -> int:
    value, unit = re.fullmatch(r"(\d+)([smhd])", duration).groups()
    return int(value) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def compress(duration: str) -> str:
    return f"{min(30, max(10, _seconds(duration) // 30))}s"


# Thresholds that are sizes, not durations: a handful of orders is a backlog here.
THRESHOLDS = {
    "EmporiumOutboxStuck": (r"> 300\b", "> 10"),
    "EmporiumOutboxBacklog": (r"> 1000\b", "> 2"),
}


def fast_rules(groups: list[dict]) -> list[dict]:
    """The chart's rules on a compressed time scale (see the module docstring)."""
    groups = json.loads(json.dumps(groups))
    for group in groups:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = compress(rule["for"])
            rule["expr"] = re.sub(r"\[(\d+[smhd])\]", lambda m: f"[{compress(m[1])}]", rule["expr"])
            if rule.get("alert") in THRESHOLDS:
                old, new = THRESHOLDS[rule["alert"]]
                rule["expr"], count = re.subn(old, new, rule["expr"])
                assert count == 1, (rule["alert"], rule["expr"])
    return groups


# -- load ---------------------------------------------------------------------------------------------


def register(http: httpx.Client) -> str:
    name = f"o{uuid.uuid4().hex[:10]}"
    body = {"email": f"{name}@example.com", "username": name, "password": "a long enough password"}
    assert http.post("/users/register", json=body).status_code == 201
    login = http.post("/users/login", json={"email": body["email"], "password": body["password"]})
    assert login.status_code == 200, login.text
    return login.json()["access_token"]


class Load:
    """Bounded background traffic through the ingress: `workers` threads each GET /products?limit=20 and,
    with orders, POST a one-item order, every 0.2 s until stopped, at most `seconds` and 20000 requests."""

    def __init__(self, token: str, product_id: int, orders: bool, workers: int = 3, seconds: float = 240):
        self.token, self.product_id, self.orders = token, product_id, orders
        self.workers, self.deadline = workers, time.monotonic() + seconds
        self.stop_event = threading.Event()
        self.statuses: list[int] = []
        self.limit = 20000
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=GATEWAY, timeout=15) as client:
            while not self.stop_event.is_set() and time.monotonic() < self.deadline:
                if len(self.statuses) >= self.limit:
                    return
                try:
                    r = client.get("/products", params={"limit": 20})
                    self.statuses.append(r.status_code)
                    if self.orders:
                        order = {"items": [{"product_id": self.product_id, "quantity": 1}]}
                        r = client.post("/orders", json=order, headers=headers)
                        self.statuses.append(r.status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)
                time.sleep(0.2)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.fixture(scope="module")
def shopper(local: Path, http: httpx.Client) -> dict:
    """A registered customer and a product of the admin's with stock for every order the load places."""
    admin = dict(line.split("=", 1) for line in (local / "admin.env").read_text().splitlines() if "=" in line)
    login = http.post(
        "/users/login", json={"email": admin["ADMIN_EMAIL"], "password": admin["ADMIN_PASSWORD"]}
    )
    assert login.status_code == 200, login.text
    product = http.post(
        "/products",
        json={
            "name": "Observability test product",
            "price": "1.00",
            "stock_quantity": 1000000,
            "sku": f"OBS-{uuid.uuid4().hex[:12]}",
            "category": "test",
        },
        headers={"Authorization": f"Bearer {login.json()['access_token']}"},
    )
    assert product.status_code == 201, product.text
    return {"token": register(http), "product_id": product.json()["id"]}


# -- tests, in order ----------------------------------------------------------------------------------


def test_make_up_prometheus_scrapes_everything_and_loads_the_charts_rules(local, obs):
    chart = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    # A rule's health is "unknown" until its group's first evaluation, which may come after make up ends.
    deadline = time.monotonic() + 120
    while True:
        loaded = {r["name"]: r for g in obs.api("/api/v1/rules")["groups"] for r in g["rules"]}
        if time.monotonic() > deadline or all(r["health"] != "unknown" for r in loaded.values()):
            break
        time.sleep(2)
    assert set(loaded) == set(chart)
    for name, rule in chart.items():
        assert loaded[name]["annotations"] == rule["annotations"], name
        assert loaded[name]["labels"] == rule["labels"], name
        assert loaded[name]["duration"] == (_seconds(rule["for"]) if "for" in rule else 0), name
        assert loaded[name]["health"] == "ok", loaded[name]
    expected = {
        "users",
        "products",
        "orders",
        "notifications",
        "emporium-system/emporium-operator",
        "istio-system/emporium-ingressgateway",
        "rabbitmq",
        "postgres",
    }
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        targets = obs.api("/api/v1/targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if set(health) >= expected and all(h == "up" for h in health.values()):
            break
        time.sleep(2)
    assert set(health) >= expected, health
    assert all(h == "up" for h in health.values()), [t for t in targets if t["health"] != "up"]


def test_compressed_rules_and_fast_timers(local, obs):
    """From here on: the chart's rules compressed in time, a 1 s interval, fast operator and reaper timers."""
    groups = rule_groups(
        [d for d in yaml.safe_load_all(helm(local, "get", "manifest", "emporium", "-n", "emporium")) if d]
    )
    assert {r["alert"] for g in groups for r in g["rules"]} == {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
    }
    obs.write_rules(fast_rules(groups))
    obs.set_interval(INTERVAL)
    obs.reload()
    helm(
        local,
        *("upgrade", "emporium-operator", str(CHARTS / "emporium-operator"), "-n", "emporium-system"),
        *("--skip-crds", "--reuse-values"),
        *("--set", "env.EMPORIUM_RECONCILE_INTERVAL=3,env.EMPORIUM_RETRY_DELAY=2"),
    )
    helm(
        local,
        *("upgrade", "emporium", str(CHARTS / "emporium"), "-n", "emporium", "--no-hooks", "--reuse-values"),
        *("--set", "orders.env.RESERVATION_GRACE_SECONDS=30,orders.env.RESERVATION_REAPER_SECONDS=5"),
    )
    workload(local, "emporium-operator").stop()
    workload(local, "orders").stop()
    restart_workloads(local)
    assert f"scrape_interval: {INTERVAL}" in obs.api("/api/v1/status/config")["yaml"]
    loaded = {r["name"]: r for g in obs.api("/api/v1/rules")["groups"] for r in g["rules"]}
    assert loaded["EmporiumTargetDown"]["duration"] == 10


def test_bounded_load_through_the_ingress(local, http, shopper):
    """Registrations, logins, listings, orders (they send emails), a websocket that receives its order's
    notification, a 404, a stock reservation no order claims (the reaper releases it): 40 s at most."""
    for _ in range(3):
        register(http)
    with Load(shopper["token"], shopper["product_id"], orders=True, workers=2, seconds=20) as load:
        time.sleep(20)
    assert load.statuses.count(201) >= 5, load.statuses[-20:]
    assert http.get("/products/999999999").status_code == 404

    async def socket() -> None:
        import websockets

        url = GATEWAY.replace("http", "ws") + "/ws/notifications?access_token=" + shopper["token"]
        async with websockets.connect(url, open_timeout=60) as ws:  # a loaded machine answers slowly
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "connected"
            order = {"items": [{"product_id": shopper["product_id"], "quantity": 1}]}
            headers = {"Authorization": f"Bearer {shopper['token']}"}
            async with httpx.AsyncClient(base_url=GATEWAY, timeout=15) as client:
                assert (await client.post("/orders", json=order, headers=headers)).status_code == 201
            await asyncio.wait_for(ws.recv(), 20)

    asyncio.run(socket())
    # an orphaned reservation (as if orders had died between reserving and saving the order)
    ports = json.loads((local / "ports.json").read_text())
    reserved = httpx.post(
        f"http://127.0.0.1:{ports['products/http']}/internal/stock/reservations",
        json={
            "reservation_id": uuid.uuid4().hex,
            "lines": [{"product_id": shopper["product_id"], "quantity": 1}],
        },
        headers={"X-Internal-Token": secret(local, "products-internal-token", "INTERNAL_TOKEN")},
        timeout=15,
    )
    assert reserved.status_code == 201, reserved.text
    mail = local / "mail"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(mail.glob("*.eml"))) < 5:
        time.sleep(1)
    assert len(list(mail.glob("*.eml"))) >= 5


def _log_entries(root: Path, component: str) -> list[dict]:
    entries = []
    for line in (root / "logs" / f"{component}.log").read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def test_one_trace_from_the_gateway_to_the_email(local, http, shopper):
    """An order placed through the ingress is one trace in Jaeger: the gateway's Envoy starts it, orders
    and products continue it over HTTP, the outbox relay's publish and the notifications consumer over
    RabbitMQ, then the email send. The services' log lines of that trace carry its id."""
    from emporium_testbed.observability import LocalTracing

    jaeger = LocalTracing(local, local / "logs").jaeger_url
    order = http.post(
        "/orders",
        json={"items": [{"product_id": shopper["product_id"], "quantity": 1}]},
        headers={"Authorization": f"Bearer {shopper['token']}"},
    )
    assert order.status_code == 201, order.text
    request_id = order.headers["x-request-id"]
    deadline = time.monotonic() + 60
    trace_ids: set[str] = set()
    while time.monotonic() < deadline and not trace_ids:
        trace_ids = {
            e["trace_id"]
            for e in _log_entries(local, "orders")
            if e.get("request_id") == request_id and e.get("trace_id")
        }
        time.sleep(0.5)
    assert len(trace_ids) == 1, f"orders logged no single trace id for request {request_id}"
    (trace_id,) = trace_ids

    def fetch(trace: str) -> str:
        return httpx.get(f"{jaeger}/api/traces/{trace}", timeout=10).text

    assert_one_complete_trace(fetch, trace_id, timeout=90, interval=2)
    for component in ("orders", "products", "notifications"):
        lines = [e for e in _log_entries(local, component) if e.get("trace_id") == trace_id]
        assert lines, f"{component} logged nothing with the order's trace id"


def test_round_1_stopped_service_poison_and_drift(local, obs, shopper):
    """products stopped under load: EmporiumTargetDown, EmporiumAppSilent, EmporiumGateway5xxRatio and
    (orders cannot reserve stock) EmporiumHighErrorRate for orders. Meanwhile: messages that are not JSON
    on the notifications queue (EmporiumDeadLetters), a row in the users outbox that is not an envelope
    (EmporiumOutboxParked), notifications.retry deleted every 4 s (EmporiumOperatorDriftRepairs)."""
    rabbit = LocalServers(local).rabbitmq
    # the broker's administrator may act in the services' vhost (publish here, delete objects below)
    rabbit.api("PUT", "/api/permissions/emporium/admin", {"configure": ".*", "write": ".*", "read": ".*"})
    stop_drift = threading.Event()

    def drift() -> None:
        while not stop_drift.wait(4):
            with contextlib.suppress(Exception):
                rabbit.api("DELETE", "/api/queues/emporium/notifications.retry")

    drifter = threading.Thread(target=drift, daemon=True)
    with Load(shopper["token"], shopper["product_id"], orders=True, workers=3, seconds=300):
        workload(local, "products").stop()
        drifter.start()
        for _ in range(3):  # a new counter series starts at its first value: increase() needs a second
            published = rabbit.api(
                "POST",
                "/api/exchanges/emporium/amq.default/publish",
                {
                    "properties": {},
                    "routing_key": "notifications.events",
                    "payload": "not json",
                    "payload_encoding": "string",
                },
            )
            assert published == {"routed": True}
            time.sleep(2)
        psql(
            local,
            "users-db",
            "INSERT INTO outbox (event_id, type, payload) "
            """VALUES (gen_random_uuid(), 'user.registered', '{"not": "an envelope"}')""",
        )
        try:
            wait_firing(obs, "EmporiumTargetDown", match=lambda labels: labels["job"] == "products")
            wait_firing(obs, "EmporiumAppSilent", match=lambda labels: labels["job"] == "products")
            wait_firing(obs, "EmporiumGateway5xxRatio")
            wait_firing(obs, "EmporiumHighErrorRate", match=lambda labels: labels["service"] == "orders")
            dead = wait_firing(obs, "EmporiumDeadLetters")
            assert (dead["labels"]["queue"], dead["labels"]["reason"]) == ("notifications.events", "invalid")
            wait_firing(obs, "EmporiumOutboxParked", match=lambda labels: "users" in labels["pod"])
            drifted = wait_firing(obs, "EmporiumOperatorDriftRepairs")
            assert drifted["annotations"]["runbook_url"] == "docs/runbooks.md#emporiumoperatordriftrepairs"
        finally:
            stop_drift.set()
            restart_workloads(local)
        psql(local, "users-db", "DELETE FROM outbox WHERE parked_at IS NOT NULL")
        for name in ("EmporiumTargetDown", "EmporiumAppSilent", "EmporiumGateway5xxRatio"):
            wait_resolved(obs, name)
        wait_resolved(obs, "EmporiumHighErrorRate")
    for name in ("EmporiumDeadLetters", "EmporiumOutboxParked", "EmporiumOperatorDriftRepairs"):
        wait_resolved(obs, name)


def test_round_2_locked_table_and_deleted_exchange(local, obs, shopper):
    """A transaction keeps an exclusive lock on the products table (1.5 s at a time): EmporiumHighLatency for
    products. The operator is down (EmporiumTargetDown) and someone deletes the events exchange: orders still
    commit (outbox), the relay's publications fail (EmporiumEventPublishFailures), the outbox ages and grows
    (EmporiumOutboxStuck, EmporiumOutboxBacklog); the operator's return repairs the drift."""
    import asyncpg

    stop = threading.Event()

    async def storm() -> None:
        conn = await asyncpg.connect(
            host=secret(local, "products-db", "host"),
            port=int(secret(local, "products-db", "port")),
            user=secret(local, "products-db", "username"),
            password=secret(local, "products-db", "password"),
            database=secret(local, "products-db", "dbname"),
        )
        try:
            while not stop.is_set():
                async with conn.transaction():
                    await conn.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
                    await asyncio.sleep(1.5)
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    rabbit = LocalServers(local).rabbitmq
    thread = threading.Thread(target=lambda: asyncio.run(storm()), daemon=True)
    workload(local, "emporium-operator").stop()
    rabbit.api("DELETE", "/api/exchanges/emporium/emporium.events")
    with Load(shopper["token"], shopper["product_id"], orders=True, workers=3, seconds=300):
        thread.start()
        try:
            wait_firing(obs, "EmporiumHighLatency", match=lambda labels: labels["service"] == "products")
        finally:
            stop.set()
            thread.join(timeout=30)
        wait_firing(
            obs, "EmporiumEventPublishFailures", match=lambda labels: labels["type"] == "order.created"
        )
        wait_firing(obs, "EmporiumOutboxStuck")
        wait_firing(obs, "EmporiumOutboxBacklog")
        wait_firing(obs, "EmporiumTargetDown", match=lambda labels: "operator" in labels["job"])
    restart_workloads(local)  # the operator's drift check declares the exchange and its bindings again
    for name in (
        "EmporiumHighLatency",
        "EmporiumOutboxStuck",
        "EmporiumOutboxBacklog",
        "EmporiumEventPublishFailures",
        "EmporiumTargetDown",
    ):
        wait_resolved(obs, name)


def test_round_3_frozen_broker_blocks_reconciles(local, obs):
    """RabbitMQ stops answering (SIGSTOP): every reconcile of a RabbitMQ object waits for the management
    API's 10 s timeout and fails: EmporiumOperatorSlowReconcile, EmporiumOperatorReconcileErrors."""
    process = LocalServers(local).rabbitmq.process
    _signal_group(process, signal.SIGSTOP)
    try:
        wait_firing(obs, "EmporiumOperatorSlowReconcile")
        wait_firing(obs, "EmporiumOperatorReconcileErrors")
    finally:
        _signal_group(process, signal.SIGCONT)
    wait_resolved(obs, "EmporiumOperatorSlowReconcile")
    wait_resolved(obs, "EmporiumOperatorReconcileErrors")


def _panel_queries() -> Iterator[tuple[str, str, str]]:
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                yield path.name, panel["title"], target["expr"]


def test_every_dashboard_panel_returns_data(local, obs):
    """Every panel's query, with the dashboard variables at "All", returns data over the last 15 minutes
    (the load and the faults above made every series exist)."""
    substitutions = {"$namespace": ".*", "$service": ".*", "$kind": ".*"}
    empty = []
    end = time.time()
    for dashboard, title, expr in _panel_queries():
        query = expr.replace("$__rate_interval", "1m").replace("$__range", "15m")
        for var, value in substitutions.items():
            query = query.replace(var, value)
        result = obs.api("/api/v1/query_range", query=query, start=str(end - 900), end=str(end), step="15")
        if not result["result"]:
            empty.append(f"{dashboard}: {title}: {query}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_every_alert_was_seen_firing(obs):
    """Prometheus's own record: ALERTS{alertstate="firing"} over the last 30 minutes names every alert."""
    result = obs.api(
        "/api/v1/query", query='count by (alertname) (max_over_time(ALERTS{alertstate="firing"}[30m]))'
    )
    fired = {r["metric"]["alertname"] for r in result["result"]}
    expected = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert fired >= expected, f"never fired: {sorted(expected - fired)}"
