"""Login throttling, the first admin, concurrent registrations, probes."""

import asyncio
import io

import pytest
from emporium_common import testing
from emporium_users import __main__ as cli
from emporium_users.main import bootstrap_admin, build_app
from emporium_users.models import LoginAttempt, User
from sqlalchemy import delete, select

from .conftest import PASSWORD, bearer, login, register


async def test_login_is_throttled_per_account(client, settings):
    await register(client)
    for _ in range(settings.login_max_failures_per_account):
        wrong = await client.post(
            "/users/login", json={"email": "ada@example.com", "password": "wrong guess"}
        )
        assert wrong.status_code == 401
    # Even the right password is refused for a while now.
    blocked = await client.post("/users/login", json={"email": "ada@example.com", "password": PASSWORD})
    assert blocked.status_code == 429
    assert blocked.json()["code"] == "too_many_requests"
    assert int(blocked.headers["retry-after"]) > 0
    # Other accounts are not affected.
    await register(client, email="bob@example.com", username="bob")
    await login(client, email="bob@example.com")


async def test_login_is_throttled_per_client_address(settings, session):
    app = build_app(settings.model_copy(update={"login_max_attempts_per_address": 3}))
    async with testing.app_client(app, session) as client:
        for i in range(3):
            response = await client.post(
                "/users/login", json={"email": f"u{i}@example.com", "password": "guess it"}
            )
            assert response.status_code == 401
        response = await client.post("/users/login", json={"email": "u9@example.com", "password": "guess it"})
        assert response.status_code == 429


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
