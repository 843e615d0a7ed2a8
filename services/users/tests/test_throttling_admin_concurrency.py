"""Login throttling, the first admin, concurrent registrations, probes."""

import asyncio
import io
import threading
import time

import pytest
from emporium_common import testing
from emporium_users import __main__ as cli
from emporium_users import security
from emporium_users.main import bootstrap_admin, build_app
from emporium_users.models import LoginAttempt, RegistrationAttempt, User
from sqlalchemy import delete, select

from .conftest import PASSWORD, bearer, login, register


def _from(address: str) -> dict[str, str]:
    # Apps built by `proxied` trust one proxy hop: the last X-Forwarded-For entry is the client address.
    return {"X-Forwarded-For": address}


@pytest.fixture
def proxied(settings):
    def build(**overrides):
        return build_app(settings.model_copy(update={"trusted_proxy_hops": 1, **overrides}))

    return build


async def _login_from(client, address: str, email: str, password: str):
    return await client.post(
        "/users/login", json={"email": email, "password": password}, headers=_from(address)
    )


async def test_guessing_from_one_address_is_stopped_but_the_owner_elsewhere_logs_in(proxied, session):
    async with testing.app_client(proxied(), session) as client:
        await register(client)
        for _ in range(5):
            wrong = await _login_from(client, "198.51.100.7", "ada@example.com", "wrong guess")
            assert wrong.status_code == 401
        # The guesser's address is done for this account, even with the right password...
        blocked = await _login_from(client, "198.51.100.7", "ada@example.com", PASSWORD)
        assert blocked.status_code == 429
        assert blocked.json()["code"] == "too_many_requests"
        assert int(blocked.headers["retry-after"]) > 0
        # ...while the owner, somewhere else, is not locked out.
        assert (await _login_from(client, "203.0.113.20", "ada@example.com", PASSWORD)).status_code == 200


async def test_one_address_trying_many_accounts_is_throttled(proxied, session):
    async with testing.app_client(proxied(login_max_failures_per_address=3), session) as client:
        for i in range(3):
            response = await _login_from(client, "198.51.100.8", f"u{i}@example.com", "guess it")
            assert response.status_code == 401
        response = await _login_from(client, "198.51.100.8", "u9@example.com", "guess it")
        assert response.status_code == 429
        # Other addresses are not affected.
        assert (await _login_from(client, "198.51.100.9", "u9@example.com", "guess it")).status_code == 401


async def test_forty_customers_behind_one_address_all_log_in_within_a_minute(proxied, session):
    # One NAT or proxy, many shoppers: successful logins are not failures and never count.
    async with testing.app_client(proxied(), session) as client:
        for i in range(40):  # signed up from their homes
            payload = {"email": f"shopper{i}@example.com", "username": f"shopper{i}", "password": PASSWORD}
            response = await client.post("/users/register", json=payload, headers=_from(f"192.0.2.{100 + i}"))
            assert response.status_code == 201
        started = time.monotonic()
        for i in range(40):
            response = await _login_from(client, "192.0.2.40", f"shopper{i}@example.com", PASSWORD)
            assert response.status_code == 200, (i, response.text)
        assert time.monotonic() - started < 60


async def test_an_account_guessed_from_many_addresses_is_slowed_down_not_locked(proxied, session):
    app = proxied(login_slowdown_after_failures=2, login_slowdown_max_seconds=0.6)
    async with testing.app_client(app, session) as client:
        await register(client)
        for i in range(4):
            wrong = await _login_from(client, f"198.51.100.{20 + i}", "ada@example.com", "x")
            assert wrong.status_code == 401
        started = time.monotonic()
        assert (await _login_from(client, "203.0.113.21", "ada@example.com", PASSWORD)).status_code == 200
        assert time.monotonic() - started >= 0.5


@pytest.fixture
async def committed_users(engine):
    """Users (emails) and attempts (addresses) a test with real concurrency committed; removed after."""
    made = {"emails": [], "addresses": []}
    yield made
    async with engine.begin() as conn:
        await conn.execute(delete(User).where(User.email.in_(made["emails"])))
        await conn.execute(delete(LoginAttempt).where(LoginAttempt.client_address.in_(made["addresses"])))
        await conn.execute(
            delete(RegistrationAttempt).where(RegistrationAttempt.client_address.in_(made["addresses"]))
        )


async def test_a_concurrent_burst_cannot_pass_the_count(proxied, committed_users):
    committed_users["emails"].append("burst@example.com")
    committed_users["addresses"] += ["198.51.100.30", "203.0.113.30"]
    async with testing.app_client(proxied()) as client:  # every request its own transaction
        await register(client, email="burst@example.com", username="burst")
        responses = await asyncio.gather(
            *(_login_from(client, "198.51.100.30", "burst@example.com", f"guess {i}") for i in range(15))
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {401, 429}
    assert 1 <= statuses.count(401) <= 5, statuses  # never more password checks than the limit


async def test_registration_is_rate_limited_per_address(proxied, session):
    async with testing.app_client(proxied(register_max_per_address=3), session) as client:
        for i in range(3):
            payload = {"email": f"new{i}@example.com", "username": f"new{i}", "password": PASSWORD}
            response = await client.post("/users/register", json=payload, headers=_from("198.51.100.40"))
            assert response.status_code == 201
        payload = {"email": "new9@example.com", "username": "new9", "password": PASSWORD}
        refused = await client.post("/users/register", json=payload, headers=_from("198.51.100.40"))
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        response = await client.post("/users/register", json=payload, headers=_from("198.51.100.41"))
        assert response.status_code == 201


async def test_concurrent_bcrypt_work_is_bounded(proxied, committed_users, monkeypatch):
    running, peak, lock = 0, 0, threading.Lock()
    real_verify = security.verify_password

    def slow_verify(password, hashed):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.5)
            return real_verify(password, hashed)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(security, "verify_password", slow_verify)
    addresses = [f"198.51.100.{50 + i}" for i in range(12)]
    committed_users["addresses"] += addresses
    app = proxied(password_hash_workers=2, password_hash_max_waiting=4)
    try:
        async with testing.app_client(app) as client:
            responses = await asyncio.gather(
                *(_login_from(client, a, f"nobody{i}@example.com", "guess") for i, a in enumerate(addresses))
            )
    finally:
        security.hashing.configure(2, 64)
    statuses = [r.status_code for r in responses]
    assert peak <= 2
    assert set(statuses) <= {401, 503} and 401 in statuses
    assert 503 in statuses, statuses  # beyond 2 running + 4 waiting: refused at once, not queued
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)


async def test_forwarded_address_is_used_only_behind_trusted_proxies(settings, session):
    app = build_app(settings.model_copy(update={"trusted_proxy_hops": 1}))
    async with testing.app_client(app, session) as client:
        await client.post(
            "/users/login",
            json={"email": "x@example.com", "password": "guess it"},
            headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.9"},
        )
    addresses = (await session.exec(select(LoginAttempt.client_address))).scalars().all()
    # The client wrote 6.6.6.6 itself; our proxy saw 203.0.113.9.
    assert addresses == ["203.0.113.9"]


async def test_concurrent_registrations_of_one_email_exactly_one_succeeds(app, engine):
    # Real concurrency: every request has its own connection and transaction (no shared test session).
    async with testing.app_client(app) as client:
        payloads = [
            {"email": "race@example.com", "username": f"racer{i}", "password": "correct horse"}
            for i in range(8)
        ]
        responses = await asyncio.gather(*(client.post("/users/register", json=p) for p in payloads))
    try:
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] + [409] * 7
    finally:
        async with engine.begin() as conn:
            await conn.execute(delete(User).where(User.email == "race@example.com"))


@pytest.fixture
async def committed_cleanup(engine):
    emails: list[str] = []
    yield emails
    async with engine.begin() as conn:
        await conn.execute(delete(User).where(User.email.in_(emails)))


async def test_create_admin_command(committed_cleanup, settings, client, monkeypatch):
    # committed_cleanup first: it must run after the test session (holding row locks) is rolled back.
    committed_cleanup.append("root@example.com")
    monkeypatch.setenv("DATABASE_URL", settings.database_url.replace("+asyncpg", ""))
    monkeypatch.setattr("sys.stdin", io.StringIO("a strong admin password\n"))
    argv = ["create-admin", "--email", "Root@Example.com", "--username", "root", "--password-stdin"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    tokens = await login(client, email="root@example.com", password="a strong admin password")
    me = (await client.get("/users/me", headers=bearer(tokens["access_token"]))).json()
    assert me["roles"] == ["admin"]
    # Running it again is harmless (idempotent).
    monkeypatch.setattr("sys.stdin", io.StringIO("a strong admin password\n"))
    assert await asyncio.to_thread(cli.main, argv) == 0


async def test_create_admin_refuses_a_weak_password(settings, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", settings.database_url.replace("+asyncpg", ""))
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    argv = ["create-admin", "--email", "weak@example.com", "--password-stdin"]
    assert await asyncio.to_thread(cli.main, argv) == 2


async def test_admin_bootstrap_from_settings_promotes_an_existing_account(
    settings, engine, committed_cleanup
):
    committed_cleanup.append("boss@example.com")
    app = build_app(settings)
    async with testing.app_client(app) as client:
        await register(client, email="boss@example.com", username="boss")
    admin_settings = settings.model_copy(
        update={"admin_email": "boss@example.com", "admin_password": "x" * 16}
    )
    app = build_app(admin_settings)
    await bootstrap_admin(app)
    await bootstrap_admin(app)  # every replica runs it at startup: idempotent
    async with engine.connect() as conn:
        role = (await conn.execute(select(User.role).where(User.email == "boss@example.com"))).scalar_one()
    assert role == "admin"


async def test_probes_and_metrics(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    await client.get("/users/me")
    metrics = (await client.get("/metrics")).text
    assert (
        'emporium_http_requests_total{method="GET",route="/users/me",service="users",status="401"}' in metrics
    )
