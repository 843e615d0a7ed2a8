"""Test helpers for services: a database per test session, per-test rollback, an HTTP client, tokens.

Typical ``services/<svc>/tests/conftest.py``::

    from emporium_common import testing

    @pytest.fixture(scope="session")
    async def database_url(postgres):
        url = testing.create_test_database(postgres, "products")
        await testing.migrate(ALEMBIC_INI, url)
        return url

    @pytest.fixture(scope="session")
    async def engine(database_url):
        async with testing.engine_for(database_url) as engine:
            yield engine

    @pytest.fixture
    async def session(engine):
        async with testing.rollback_session(engine) as session:
            yield session

    @pytest.fixture
    async def client(app, session):
        async with testing.app_client(app, session) as client:
            yield client
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from .auth import StaticKeySet, TokenVerifier
from .db import create_engine
from .deps import get_session
from .migrations import upgrade_head_async

# Schemathesis examples per operation in the services' OpenAPI fuzz tests: 200 in ``make test`` and
# ``make fuzz`` (tools/test.sh sets SCHEMATHESIS_MAX_EXAMPLES=200), 25 in a bare ``pytest`` run.
FUZZ_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))


def fuzz_timeout(operations: int = 1, seconds_per_example: float = 1.0) -> int:
    """pytest-timeout seconds for a fuzz test running ``operations`` x ``FUZZ_EXAMPLES`` examples (positive
    and negative): a second per example, a generous bound on a busy machine; never below the default 600."""
    return max(600, round(2 * operations * FUZZ_EXAMPLES * seconds_per_example))


def fuzz_settings() -> Any:
    """Hypothesis settings for a schemathesis test of a service's OpenAPI: ``FUZZ_EXAMPLES`` per operation,
    no per-example deadline (a shared machine is slow at times), the same examples on every run."""
    from hypothesis import HealthCheck, Phase, settings

    return settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        derandomize=True,
    )


def call_without_server_error(case: Any, base_url: str, headers: dict[str, str]) -> None:
    """Send one generated request to a real server; any 5xx fails the test with the request to repeat it."""
    from schemathesis.checks import not_a_server_error

    response = case.call(base_url=base_url, headers=headers, timeout=15)
    case.validate_response(response, checks=[not_a_server_error])


def create_test_database(postgres: Any, prefix: str) -> str:
    """A fresh database on the test bed's Postgres (``postgres`` fixture); returns its postgresql:// URL."""
    return postgres.create_database(f"test_{prefix}_{uuid.uuid4().hex[:8]}")


async def migrate(alembic_ini: str | Path, database_url: str) -> None:
    """Run a service's Alembic migrations (upgrade head) into database_url."""
    await upgrade_head_async(alembic_ini, database_url)


@asynccontextmanager
async def engine_for(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@asynccontextmanager
async def rollback_session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session inside an outer transaction that is rolled back at the end ("join an external
    transaction"): code under test may commit and roll back freely, each commit only releases a SAVEPOINT."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        session = AsyncSession(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield session
        finally:
            await session.close()
            if transaction.is_active:
                await transaction.rollback()


@asynccontextmanager
async def app_client(
    app: FastAPI, session: AsyncSession | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client calling the app in-process; with ``session``, every request uses that session."""
    if session is not None:

        async def _session() -> AsyncIterator[AsyncSession]:
            yield session

        app.dependency_overrides[get_session] = _session
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            yield client
    finally:
        app.dependency_overrides.pop(get_session, None)


class TokenFactory:
    """Signs test tokens like the users service does (ES256, kid, full claims) and verifies them.

    ``create_app(settings, routers, token_verifier=factory.verifier())`` lets a service's tests call
    authenticated routes with ``headers=factory.auth_header(sub="1", roles=["admin"])``.
    """

    def __init__(self, issuer: str = "https://emporium.local/users", audience: str = "emporium") -> None:
        self.issuer, self.audience = issuer, audience
        self.kid = uuid.uuid4().hex[:16]
        self.private_key = ec.generate_private_key(ec.SECP256R1())

    @property
    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update(kid=self.kid, alg="ES256", use="sig")
        return {"keys": [jwk]}

    def verifier(self) -> TokenVerifier:
        return TokenVerifier(StaticKeySet(self.jwks), issuer=self.issuer, audience=self.audience)

    def token(
        self,
        sub: str = "1",
        *,
        email: str | None = "user@example.com",
        roles: Iterable[str] = ("customer",),
        ttl: int = 900,
        **overrides: Any,
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "email": email,
            "roles": list(roles),
        }
        claims.update(overrides)
        return jwt.encode(claims, self.private_key, algorithm="ES256", headers={"kid": self.kid})

    def auth_header(self, sub: str = "1", **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub, **kwargs)}"}


def serve_in_thread(app: FastAPI, timeout: float = 20) -> tuple[Any, Any, str]:
    """Run app with uvicorn on a free loopback port in a daemon thread (for tests that need a real HTTP
    server, e.g. schemathesis). Returns (server, thread, base URL); stop with ``server.should_exit = True``
    and ``thread.join()``."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"the test server did not start within {timeout} s")
    return server, thread, f"http://127.0.0.1:{port}"
