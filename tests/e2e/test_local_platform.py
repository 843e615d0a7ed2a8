"""`make up` end to end: the local platform comes up from the charts, the README walkthrough works through
the real ingress (istiod + Envoy enforcing the chart's JWT and authorization rules), and `make down`
leaves no process behind.

One module-scoped platform in a temporary root; the ingress uses fixed ports (8080, 15000, 15010, 15021),
so a `make up` already running on the machine makes this test fail at start with a clear message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import sys
import time
import uuid
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
pytestmark = pytest.mark.timeout(1200)


def platform(root: Path, command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emporium_testbed.platform", command, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory):
    assert not port_open("127.0.0.1", GATEWAY_PORT), "port 8080 is taken (is `make up` running? `make down`)"
    root = tmp_path_factory.mktemp("platform")
    for folder in (root, root.parent, root.parent.parent):
        folder.chmod(folder.stat().st_mode | 0o111)  # postgres and rabbitmq users traverse into it
    started = time.monotonic()
    try:
        up = platform(root, "up")
        assert up.returncode == 0, f"make up failed:\n{up.stdout[-3000:]}\n{up.stderr[-5000:]}"
        print(f"cold up: {time.monotonic() - started:.0f} s")
        yield root
    finally:
        pids = [int(p.read_text()) for p in root.rglob("*.pid") if p.read_text().strip().isdigit()]
        down = platform(root, "down", timeout=300)
        assert down.returncode == 0, down.stderr
        alive = [pid for pid in pids if pid_alive(pid)]
        assert not alive, f"processes left after down: {alive}"
        assert not port_open("127.0.0.1", GATEWAY_PORT)


@pytest.fixture(scope="module")
def http():
    with httpx.Client(base_url=GATEWAY, timeout=20) as client:
        yield client


def kubectl(root: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [tool("kubectl"), f"--kubeconfig={root / 'kubeconfig'}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def register_and_login(http: httpx.Client) -> tuple[dict, str]:
    name = f"u{uuid.uuid4().hex[:10]}"
    body = {"email": f"{name}@example.com", "username": name, "password": "a long enough password"}
    created = http.post("/users/register", json=body)
    assert created.status_code == 201, created.text
    login = http.post("/users/login", json={"email": body["email"], "password": body["password"]})
    assert login.status_code == 200, login.text
    return created.json(), login.json()["access_token"]


def admin_token(root: Path, http: httpx.Client) -> str:
    env = dict(line.split("=", 1) for line in (root / "admin.env").read_text().split())
    login = http.post("/users/login", json={"email": env["ADMIN_EMAIL"], "password": env["ADMIN_PASSWORD"]})
    assert login.status_code == 200, login.text
    return login.json()["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_readme_walkthrough(local, http):
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
    mails = [p.read_text(errors="replace") for p in (local / "mail").glob("*.eml")]
    assert any(user["email"] in mail for mail in mails)


def test_kubectl_walkthrough(local):
    for kind in ("postgresdatabases", "rabbittopologies"):
        listing = kubectl(local, "get", kind, "-n", "emporium")
        assert "READY" in listing.upper()
        rows = listing.strip().splitlines()[1:]
        assert rows and all(" True " in f" {row} " for row in rows), listing
    database = {
        "apiVersion": "emporium.dev/v1alpha1",
        "kind": "PostgresDatabase",
        "metadata": {"name": "walkthrough", "namespace": "emporium"},
        "spec": {"serverRef": {"name": "postgres"}},
    }
    kubectl(local, "apply", "-f", "-", stdin=yaml.safe_dump(database))
    kubectl(
        local,
        "wait",
        "postgresdatabase/walkthrough",
        "-n",
        "emporium",
        "--for=condition=Ready",
        "--timeout=120s",
    )
    secret = json.loads(kubectl(local, "get", "secret", "walkthrough-db", "-n", "emporium", "-o", "json"))
    assert base64.b64decode(secret["data"]["dbname"]).decode() == "walkthrough"


def _signing_key(local: Path, http: httpx.Client) -> tuple[str, object]:
    """The users service's current signing key (from its Secret) and its kid (from the published JWKS)."""
    secret = json.loads(kubectl(local, "get", "secret", "users-jwt-keys", "-n", "emporium", "-o", "json"))
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(base64.b64decode(secret["data"]["current.pem"]), password=None)
    public = key.public_key().public_numbers()
    for jwk in http.get("/.well-known/jwks.json").json()["keys"]:
        candidate = jwt.PyJWK(jwk).key.public_numbers()
        if (candidate.x, candidate.y) == (public.x, public.y):
            return jwk["kid"], key
    raise AssertionError("the current signing key is not in the published key set")


def test_ingress_rejects_bad_tokens(local, http):
    _, token = register_and_login(http)
    kid, key = _signing_key(local, http)
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


def test_ingress_enforces_roles_and_public_routes(local, http):
    _, customer = register_and_login(http)
    product = {
        "name": "Edge case",
        "price": "1.00",
        "stock_quantity": 1,
        "sku": f"EDGE-{uuid.uuid4().hex[:6]}",
    }
    assert http.post("/products", json=product, headers=bearer(customer)).status_code == 403
    assert http.post("/products", json=product, headers=bearer(admin_token(local, http))).status_code == 201
    for public in ("/health", "/products", "/.well-known/jwks.json", "/.well-known/openid-configuration"):
        assert http.get(public).status_code == 200, public
    assert (
        http.post(
            "/users/login", json={"email": "nobody@example.com", "password": "wrong password"}
        ).status_code
        == 401
    )


def test_sign_in_with_the_local_openid_provider(local, http):
    """make up's users service signs people up and in through the local OpenID provider (mock-oauth2-server),
    every step of ours through the ingress: /auth/oidc/ is routed and public, linking needs a token."""
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
def test_path_tricks_cannot_bypass_rules(local, http, path):
    # an absolute URL: relative to the base URL, httpx would send "//orders" as "/" (a network-path reference)
    response = http.get(f"{GATEWAY}{path}")
    # Refused or not found, never the protected list served without a token.
    assert response.status_code in (400, 401, 403, 404), (path, response.status_code, response.text[:200])


def test_websocket_through_ingress_delivers_only_own_events(local, http):
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


def test_load_generator_journeys_run_without_failures(local, tmp_path):
    """The loadgenerator chart's locustfile, briefly against the local ingress (4 users, 10 s)."""
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
            "10s",
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
