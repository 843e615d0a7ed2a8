"""The end-to-end suite, written once and run against both platforms: `make up` ("local": processes on this
machine, istiod + upstream Envoy as the ingress) and `make kind-up` ("kind": a kind cluster with real images,
pods, sidecars and Istio). The README walkthrough, the JWT and path rules at the edge, 25 concurrent orders on
stock 10, order -> notification over the websocket, a `kubectl apply` of a new PostgresDatabase whose Secret
(on kind) a pod then uses, and the load generator's journeys.

The local platform is module-scoped, started in a temporary root by the fixture and stopped (`make down`, no
process left) before the kind tests start; the kind one is the session's cluster (tests/e2e/conftest.py:
created by the first kind test, deleted at the session's end). Both answer on the fixed port 8080, so they run
one after the other (conftest.py orders every kind test last).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
import websockets
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from emporium_testbed.ingress import GATEWAY_PORT
from emporium_testbed.oidc import MockOIDCProvider
from emporium_testbed.process import pid_alive, port_open
from emporium_testbed.toolchain import tool

GATEWAY = f"http://127.0.0.1:{GATEWAY_PORT}"
pytestmark = pytest.mark.timeout(2400)


@dataclass
class Platform:
    """What a test needs from a running platform besides its ingress."""

    name: str
    kubectl_args: list[str]  # how to reach its API server
    admin_env: Callable[[], dict[str, str]]  # ADMIN_EMAIL, ADMIN_PASSWORD
    mails: Callable[[], list[str]]  # every mail the SMTP sink received (raw text or JSON)
    root: Path | None = None  # make up's .local root (local only)

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [tool("kubectl"), *self.kubectl_args, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout


def run_platform(root: Path, command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emporium_testbed.platform", command, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def local_platform(root: Path):
    for folder in (root, root.parent, root.parent.parent):
        folder.chmod(folder.stat().st_mode | 0o111)  # postgres and rabbitmq users traverse into it
    started = time.monotonic()
    try:
        up = run_platform(root, "up")
        assert up.returncode == 0, f"make up failed:\n{up.stdout[-3000:]}\n{up.stderr[-5000:]}"
        print(f"cold up: {time.monotonic() - started:.0f} s")
        yield Platform(
            name="local",
            kubectl_args=[f"--kubeconfig={root / 'kubeconfig'}"],
            admin_env=lambda: dict(line.split("=", 1) for line in (root / "admin.env").read_text().split()),
            mails=lambda: [p.read_text(errors="replace") for p in (root / "mail").glob("*.eml")],
            root=root,
        )
    finally:
        pids = [int(p.read_text()) for p in root.rglob("*.pid") if p.read_text().strip().isdigit()]
        down = run_platform(root, "down", timeout=300)
        assert down.returncode == 0, down.stderr
        alive = [pid for pid in pids if pid_alive(pid)]
        assert not alive, f"processes left after down: {alive}"
        assert not port_open("127.0.0.1", GATEWAY_PORT)


@pytest.fixture(scope="module", params=["local", "kind"])
def platform(request, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "local":
        assert not port_open("127.0.0.1", GATEWAY_PORT), (
            "port 8080 is taken (is `make up` running? `make down`)"
        )
        with local_platform(tmp_path_factory.mktemp("platform")) as running:
            yield running
    else:
        cluster = request.getfixturevalue("kind_cluster")  # tests/e2e/conftest.py: one per session
        yield Platform(
            name="kind", kubectl_args=cluster.kubectl_args, admin_env=cluster.admin_env, mails=cluster.mails
        )


@pytest.fixture(scope="module")
def http(platform):
    with httpx.Client(base_url=GATEWAY, timeout=20) as client:
        yield client


def register_and_login(http: httpx.Client) -> tuple[dict, str]:
    name = f"u{uuid.uuid4().hex[:10]}"
    body = {"email": f"{name}@example.com", "username": name, "password": "a long enough password"}
    created = http.post("/users/register", json=body)
    assert created.status_code == 201, created.text
    login = http.post("/users/login", json={"email": body["email"], "password": body["password"]})
    assert login.status_code == 200, login.text
    return created.json(), login.json()["access_token"]


def admin_token(platform: Platform, http: httpx.Client) -> str:
    env = platform.admin_env()
    login = http.post("/users/login", json={"email": env["ADMIN_EMAIL"], "password": env["ADMIN_PASSWORD"]})
    assert login.status_code == 200, login.text
    return login.json()["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_readme_walkthrough(platform, http):
    assert http.get("/health").status_code == 200
    user, token = register_and_login(http)
    me = http.get("/users/me", headers=bearer(token))
    assert me.status_code == 200 and me.json()["email"] == user["email"]

    products = http.get("/products", params={"limit": 100}).json()
    assert products["total"] >= 12  # the sample catalog, loaded on first start
    product = next(p for p in products["items"] if p["stock_quantity"] >= 2)

    order = http.post(
        "/orders", json={"items": [{"product_id": product["id"], "quantity": 2}]}, headers=bearer(token)
    )
    assert order.status_code == 201, order.text
    assert order.json()["total_amount"] == f"{2 * float(product['price']):.2f}"

    deadline = time.monotonic() + 60
    for_order: list = []
    welcome: list = []  # user.registered brings a welcome notification
    while time.monotonic() < deadline and not (for_order and welcome):
        response = http.get("/notifications", headers=bearer(token))
        if response.status_code != 200:  # e.g. 503 + Retry-After while the service is busy: poll again
            time.sleep(0.5)
            continue
        notifications = response.json()["notifications"]
        for_order = [n for n in notifications if n["order_id"] == order.json()["id"]]
        welcome = [n for n in notifications if n["order_id"] is None]
        time.sleep(0.5)
    assert len(for_order) == 1 and for_order[0]["type"] == "order_confirmation"
    assert for_order[0]["recipient_email"] == user["email"]
    assert len(welcome) == 1
    deadline = time.monotonic() + 30
    while not any(user["email"] in mail for mail in platform.mails()) and time.monotonic() < deadline:
        time.sleep(1)
    assert any(user["email"] in mail for mail in platform.mails())


def test_kubectl_walkthrough(platform):
    for kind in ("postgresdatabases", "rabbittopologies"):
        listing = platform.kubectl("get", kind, "-n", "emporium")
        assert "READY" in listing.upper()
        rows = listing.strip().splitlines()[1:]
        assert rows and all(" True " in f" {row} " for row in rows), listing
    database = {
        "apiVersion": "emporium.dev/v1alpha1",
        "kind": "PostgresDatabase",
        "metadata": {"name": "walkthrough", "namespace": "emporium"},
        "spec": {"serverRef": {"name": "postgres"}},
    }
    platform.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(database))
    platform.kubectl(
        "wait",
        "postgresdatabase/walkthrough",
        "-n",
        "emporium",
        "--for=condition=Ready",
        "--timeout=120s",
    )
    secret = json.loads(platform.kubectl("get", "secret", "walkthrough-db", "-n", "emporium", "-o", "json"))
    assert base64.b64decode(secret["data"]["dbname"]).decode() == "walkthrough"
    if platform.name == "kind":
        # a pod (outside the mesh: a plain client) connects with nothing but what the Secret holds
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "walkthrough-client",
                "namespace": "emporium",
                "annotations": {"sidecar.istio.io/inject": "false"},
            },
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsNonRoot": True, "runAsUser": 70},
                "containers": [
                    {
                        "name": "psql",
                        "image": "emporium.local/postgres:15-bookworm",
                        "imagePullPolicy": "IfNotPresent",
                        # a new pod's address reaches the CNI's NetworkPolicy sets a moment after it
                        # starts (until then Postgres' policy refuses it): retry for up to a minute
                        "command": [
                            "sh",
                            "-c",
                            'for i in $(seq 30); do psql "$DATABASE_URL" -tAc "select current_database()" '
                            "&& exit 0; sleep 2; done; exit 1",
                        ],
                        "envFrom": [{"secretRef": {"name": "walkthrough-db"}}],
                    }
                ],
            },
        }
        platform.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pod))
        try:
            platform.kubectl(
                "wait",
                "pod/walkthrough-client",
                "-n",
                "emporium",
                "--for=jsonpath={.status.phase}=Succeeded",
                "--timeout=120s",
            )
            output = platform.kubectl("logs", "walkthrough-client", "-n", "emporium").strip()
            assert output.splitlines()[-1] == "walkthrough", output
        finally:
            platform.kubectl("delete", "pod", "walkthrough-client", "-n", "emporium", "--wait=false")


def test_concurrent_buyers_never_oversell(platform, http):
    """25 orders for the last 10 pieces at once through the ingress: exactly 10 orders succeed, the
    others are refused with a clear 4xx, and the stock ends at 0 (never negative)."""
    product = {
        "name": "Scarce item",
        "price": "3.00",
        "stock_quantity": 10,
        "sku": f"SCARCE-{uuid.uuid4().hex[:6]}",
    }
    created = http.post("/products", json=product, headers=bearer(admin_token(platform, http)))
    assert created.status_code == 201, created.text
    product_id = created.json()["id"]
    # 5 customers with 5 concurrent orders each (25 logins would trip the per-address login throttle)
    tokens = [register_and_login(http)[1] for _ in range(5)] * 5

    def buy(token: str) -> int:
        with httpx.Client(base_url=GATEWAY, timeout=60) as client:
            return client.post(
                "/orders", json={"items": [{"product_id": product_id, "quantity": 1}]}, headers=bearer(token)
            ).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=25) as pool:
        codes = list(pool.map(buy, tokens))
    assert codes.count(201) == 10, codes
    assert all(400 <= code < 500 for code in codes if code != 201), codes
    assert http.get(f"/products/{product_id}").json()["stock_quantity"] == 0


def _signing_key(platform: Platform, http: httpx.Client) -> tuple[str, object]:
    """The users service's current signing key (from its Secret) and its kid (from the published JWKS)."""
    secret = json.loads(platform.kubectl("get", "secret", "users-jwt-keys", "-n", "emporium", "-o", "json"))
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(base64.b64decode(secret["data"]["current.pem"]), password=None)
    public = key.public_key().public_numbers()
    for jwk in http.get("/.well-known/jwks.json").json()["keys"]:
        candidate = jwt.PyJWK(jwk).key.public_numbers()
        if (candidate.x, candidate.y) == (public.x, public.y):
            return jwk["kid"], key
    raise AssertionError("the current signing key is not in the published key set")


def test_ingress_rejects_bad_tokens(platform, http):
    _, token = register_and_login(http)
    kid, key = _signing_key(platform, http)
    claims = jwt.decode(token, options={"verify_signature": False})
    now = int(time.time())
    expired = jwt.encode(
        {**claims, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600},
        key,
        algorithm="ES256",
        headers={"kid": kid},
    )
    head, payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged["roles"] = ["admin"]
    tampered = ".".join(
        [head, base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode(), signature]
    )
    stranger = jwt.encode(
        claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": kid}
    )
    unsigned = jwt.encode(claims, None, algorithm="none")

    assert http.get("/orders", headers=bearer(token)).status_code == 200
    assert http.get("/orders").status_code in (401, 403)  # no token: refused
    for bad in (expired, tampered, stranger, unsigned):
        response = http.get("/orders", headers=bearer(bad))
        assert response.status_code == 401, (response.status_code, response.text)


def test_ingress_enforces_roles_and_public_routes(platform, http):
    _, customer = register_and_login(http)
    product = {
        "name": "Edge case",
        "price": "1.00",
        "stock_quantity": 1,
        "sku": f"EDGE-{uuid.uuid4().hex[:6]}",
    }
    assert http.post("/products", json=product, headers=bearer(customer)).status_code == 403
    assert (
        http.post("/products", json=product, headers=bearer(admin_token(platform, http))).status_code == 201
    )
    for public in ("/health", "/products", "/.well-known/jwks.json", "/.well-known/openid-configuration"):
        assert http.get(public).status_code == 200, public
    assert (
        http.post(
            "/users/login", json={"email": "nobody@example.com", "password": "wrong password"}
        ).status_code
        == 401
    )


# make up only: the kind cluster has no OpenID provider (the users chart configures none by default)
@pytest.mark.parametrize("platform", ["local"], indirect=True)
def test_sign_in_with_the_local_openid_provider(platform, http):
    """make up's users service signs people up and in through the local OpenID provider (mock-oauth2-server),
    every step of ours through the ingress: /auth/oidc/ is routed and public, linking needs a token."""
    local = platform.root
    assert local is not None
    providers = http.get("/auth/oidc/providers")
    assert providers.status_code == 200, providers.text
    assert [(p["name"], p["display_name"]) for p in providers.json()] == [("mock", "Test ID (local)")]
    start = http.get("/auth/oidc/mock/start")
    assert start.status_code == 302, start.text
    oidc_port = json.loads((local / "state.json").read_text())["oidc_port"]
    assert start.headers["location"].startswith(f"http://127.0.0.1:{oidc_port}/emporium/authorize?")
    name = f"oidc{uuid.uuid4().hex[:8]}"
    provider = MockOIDCProvider(local / "data" / "oidc", port=oidc_port)
    callback = provider.sign_in(
        start.headers["location"], f"sub-{name}", {"email": f"{name}@example.com", "email_verified": True}
    )
    assert callback.startswith(f"{GATEWAY}/auth/oidc/mock/callback?")
    finished = http.get(callback.removeprefix(GATEWAY))  # the client carries the start's cookie
    assert finished.status_code == 200, finished.text
    tokens = http.post("/auth/oidc/token", json={"code": finished.json()["code"]})
    assert tokens.status_code == 200, tokens.text
    me = http.get("/users/me", headers=bearer(tokens.json()["access_token"]))
    assert me.status_code == 200 and me.json()["email"] == f"{name}@example.com"
    assert http.get(callback.removeprefix(GATEWAY)).status_code == 400  # the callback works once
    assert http.post("/auth/oidc/mock/link", json={}).status_code == 403  # the edge wants a token


@pytest.mark.parametrize(
    "path",
    ["//orders", "/products/../orders", "/%2Forders", "/orders%2F", "/products/..%2Forders", "/ORDERS"],
)
def test_path_tricks_cannot_bypass_rules(platform, http, path):
    # an absolute URL: relative to the base URL, httpx would send "//orders" as "/" (a network-path reference)
    response = http.get(f"{GATEWAY}{path}")
    # Refused or not found, never the protected list served without a token.
    assert response.status_code in (400, 401, 403, 404), (path, response.status_code, response.text[:200])


def test_websocket_through_ingress_delivers_only_own_events(platform, http):
    _, mine = register_and_login(http)
    _, theirs = register_and_login(http)
    product = next(
        p for p in http.get("/products", params={"limit": 100}).json()["items"] if p["stock_quantity"] > 2
    )
    ws_url = GATEWAY.replace("http", "ws") + "/ws/notifications?access_token="

    async def messages(socket, seconds: float) -> list[dict]:
        """Every message the socket receives within seconds (e.g. welcome notifications arrive too)."""
        received: list[dict] = []
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while (left := deadline - time.monotonic()) > 0:
                received.append(json.loads(await asyncio.wait_for(socket.recv(), left)))
        return received

    async def scenario() -> tuple[int, list[dict], list[dict]]:
        async with websockets.connect(ws_url + mine) as own, websockets.connect(ws_url + theirs) as other:
            assert json.loads(await asyncio.wait_for(own.recv(), 10))["type"] == "connected"
            assert json.loads(await asyncio.wait_for(other.recv(), 10))["type"] == "connected"
            order = await asyncio.to_thread(
                http.post,
                "/orders",
                json={"items": [{"product_id": product["id"], "quantity": 1}]},
                headers=bearer(mine),
            )
            assert order.status_code == 201, order.text
            own_messages, other_messages = await asyncio.gather(messages(own, 15), messages(other, 15))
            return order.json()["id"], own_messages, other_messages

    order_id, own_messages, other_messages = asyncio.run(scenario())

    def about_order(received: list[dict]) -> list[dict]:
        return [m for m in received if m["type"] == "notification" and m["data"].get("order_id") == order_id]

    assert len(about_order(own_messages)) == 1, own_messages
    assert about_order(other_messages) == [], other_messages  # another user never sees my order
    assert http.get("/ws/notifications").status_code in (401, 403)  # no token, no socket


def test_load_generator_journeys_run_without_failures(platform, tmp_path):
    """The loadgenerator chart's locustfile, briefly against the ingress (4 users, 20 s)."""
    locustfile = Path(__file__).resolve().parents[2] / "charts" / "loadgenerator" / "files" / "locustfile.py"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(locustfile),
            "--headless",
            "--host",
            GATEWAY,
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "20s",  # on a busy 2-core machine Locust itself takes seconds to start its users
            "--csv",
            str(tmp_path / "load"),
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    stats = {
        row.split(",")[1]: row.split(",")
        for row in (tmp_path / "load_stats.csv").read_text().splitlines()[1:]
    }
    aggregated = stats["Aggregated"]
    requests, failures = int(aggregated[2]), int(aggregated[3])
    assert run.returncode == 0 and failures == 0, run.stderr[-3000:]
    assert requests >= 10
