"""A database that is restarting or unreachable is a 503 with Retry-After, never a 500; errors never log
bound parameters or the values Postgres echoes."""

import asyncio
import json
import time

import asyncpg
import httpx
import pytest
from emporium_common import SessionDep, Settings, create_app, testing
from emporium_common.errors import is_database_unavailable
from emporium_testbed.postgres import PostgresServer
from fastapi import APIRouter
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

router = APIRouter()

UNAVAILABLE = [
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InterfaceError("connection is closed"),
    ConnectionRefusedError(111, "Connect call failed"),
]


@router.get("/raise/{index}")
async def raise_driver_error(index: int) -> dict:
    # What SQLAlchemy raises for these: a DBAPIError (not an OperationalError) around the driver's error.
    raise DBAPIError("SELECT 1", None, UNAVAILABLE[index])


# The personal data comes in with the request (a literal here would show in the logged traceback).
@router.get("/not-a-connection-problem")
async def data_error(email: str, session: SessionDep) -> dict:
    await session.exec(text("SELECT 1 / :zero, :email"), params={"zero": 0, "email": email})
    return {}


@router.get("/duplicate")
async def duplicate(email: str, session: SessionDep) -> dict:
    await session.exec(text("CREATE TEMP TABLE t (email text UNIQUE)"))
    await session.exec(text("INSERT INTO t VALUES (:e), (:e)"), params={"e": email})
    return {}


@router.get("/read")
async def read(session: SessionDep) -> dict:
    return {"n": (await session.exec(text("SELECT count(*) FROM pg_class"))).scalar_one()}


@router.post("/write")
async def write(session: SessionDep) -> dict:
    await session.exec(text("INSERT INTO hits DEFAULT VALUES"))
    await session.commit()
    return {}


def _app(database_url: str):
    return create_app(Settings(service_name="dbdemo", database_url=database_url), [router])


@pytest.mark.parametrize("index", range(len(UNAVAILABLE)), ids=[type(e).__name__ for e in UNAVAILABLE])
async def test_connection_class_errors_are_503_with_retry_after(common_database_url, index):
    async with testing.app_client(_app(common_database_url)) as client:
        response = await client.get(f"/raise/{index}")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["code"] == "service_unavailable"


def test_statement_errors_are_not_called_unavailable():
    assert not is_database_unavailable(DBAPIError("SELECT 1/0", None, asyncpg.DivisionByZeroError("x")))
    assert not is_database_unavailable(ValueError("x"))


async def test_sql_errors_are_500_and_logged_without_parameters(common_database_url, capsys):
    transport = httpx.ASGITransport(app=_app(common_database_url), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        params = {"email": "ada.lovelace@example.com"}
        assert (await client.get("/not-a-connection-problem", params=params)).status_code == 500
        params = {"email": "grace.hopper@example.com"}
        assert (await client.get("/duplicate", params=params)).status_code == 500
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    logged = [entry for entry in lines if entry["logger"] != "httpx"]  # the test client's own log
    out = json.dumps(logged)
    errors = [entry for entry in logged if entry["level"] == "ERROR"]
    assert len(errors) >= 2
    assert "division by zero" in out and "duplicate key" in out  # the error itself is logged...
    assert "ada.lovelace" not in out and "grace.hopper" not in out  # ...its values are not


async def _load(client: httpx.AsyncClient, method: str, path: str, stop: asyncio.Event, seen: list) -> None:
    while not stop.is_set():
        try:
            response = await client.request(method, path)
            seen.append((time.monotonic(), method, response.status_code))
        except httpx.HTTPError as exc:  # the app itself must always answer
            seen.append((time.monotonic(), method, repr(exc)))
        await asyncio.sleep(0.01)


async def test_postgres_restart_under_load_never_yields_500(testbed_dir):
    """Fast shutdown and restart of Postgres while reads and writes keep coming: only 200 or 503.
    (A server of its own: the shared one keeps serving the other tests.)"""
    server = PostgresServer(testbed_dir / "restarted-postgres").start()
    try:
        url = server.create_database("restart")
        server.psql("CREATE TABLE hits (id serial PRIMARY KEY)", dbname="restart")
        app = _app(url)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        stop, seen = asyncio.Event(), []
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as client:
            workers = [
                asyncio.create_task(_load(client, method, path, stop, seen))
                for method, path in [("GET", "/read"), ("GET", "/read"), ("POST", "/write")]
            ]
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(0.5)  # down: refused connections
            await asyncio.to_thread(server.start)
            back = time.monotonic()
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.gather(*workers)
        await app.state.engine.dispose()
    finally:
        server.stop()
    statuses = [status for _, _, status in seen]
    assert all(status in (200, 503) for status in statuses), sorted(set(map(str, statuses)))
    assert 503 in statuses  # the restart was seen
    # Once Postgres is back, reads answer again: the last half second of reads is all 200.
    late_reads = [s for t, m, s in seen if m == "GET" and t > back + 1.0]
    assert late_reads and all(s == 200 for s in late_reads), late_reads
