"""PgListener against the test bed's Postgres: notifications arrive, a terminated backend is replaced (and the
hooks say so), stop and cancel close the connection, a database that is not there yet is waited for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import asyncpg
import pytest
from emporium_common.pg_listen import PgListener


class Recorder:
    """The hooks of one PgListener, recorded."""

    def __init__(self) -> None:
        self.payloads: asyncio.Queue[str] = asyncio.Queue()
        self.connects = 0
        self.listening = False

    def on_notify(self, connection, pid: int, channel: str, payload: str) -> None:
        self.payloads.put_nowait(payload)

    def on_connect(self) -> None:
        self.connects += 1
        self.listening = True

    def on_disconnect(self) -> None:
        self.listening = False


async def eventually(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def eventually_async(pids, seconds: float) -> bool:
    """True once ``await pids()`` is empty (a closed connection's backend exits a moment later)."""
    deadline = time.monotonic() + seconds
    while await pids():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def backends(connection: asyncpg.Connection, application_name: str) -> list[int]:
    rows = await connection.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
        application_name,
    )
    return [row["pid"] for row in rows]


@pytest.fixture
async def other(common_database_url):
    """Another connection: it notifies, terminates backends and looks at pg_stat_activity."""
    connection = await asyncpg.connect(common_database_url)
    yield connection
    await connection.close()


def listener_for(database_url: str, recorder: Recorder, channel: str, name: str) -> PgListener:
    return PgListener(
        database_url,
        channel,
        recorder.on_notify,
        on_connect=recorder.on_connect,
        on_disconnect=recorder.on_disconnect,
        application_name=name,
        log_message="test listener failed",
    )


async def test_notifications_arrive_and_a_terminated_connection_is_replaced(common_database_url, other):
    channel, name = f"pg_listen_{uuid.uuid4().hex[:8]}", f"pg-listen-{uuid.uuid4().hex[:8]}"
    recorder = Recorder()
    # the URL as the services' settings hold it (SQLAlchemy's dialect prefix)
    url = common_database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    listener = listener_for(url, recorder, channel, name)
    task = asyncio.create_task(listener.run())
    try:
        assert await eventually(lambda: recorder.connects == 1, 20), "the listener never connected"
        await other.execute("SELECT pg_notify($1, 'one')", channel)
        assert await asyncio.wait_for(recorder.payloads.get(), 5) == "one"

        (first,) = await backends(other, name)
        terminated = await other.fetchval("SELECT pg_terminate_backend($1)", first)
        assert terminated
        # the termination callback reports the loss at once, not at the next check
        assert await eventually(lambda: not recorder.listening, 2), "on_disconnect was not called"
        assert await eventually(lambda: recorder.connects == 2, 20), "the listener did not reconnect"
        assert recorder.listening
        (second,) = await backends(other, name)
        assert second != first

        await other.execute("SELECT pg_notify($1, 'two')", channel)
        assert await asyncio.wait_for(recorder.payloads.get(), 5) == "two"
        assert recorder.payloads.empty()

        listener.stop()
        await asyncio.wait_for(task, 5)
        assert not recorder.listening
        gone = await eventually_async(lambda: backends(other, name), 5)
        assert gone, "the LISTEN connection is still open after stop()"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_cancelling_the_task_closes_the_connection(common_database_url, other):
    channel, name = f"pg_listen_{uuid.uuid4().hex[:8]}", f"pg-listen-{uuid.uuid4().hex[:8]}"
    recorder = Recorder()
    task = asyncio.create_task(listener_for(common_database_url, recorder, channel, name).run())
    assert await eventually(lambda: recorder.connects == 1, 20), "the listener never connected"
    assert await backends(other, name)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert not recorder.listening
    assert await eventually_async(lambda: backends(other, name), 5), "the connection outlived its task"


async def test_a_database_that_is_not_there_yet_is_retried_with_backoff(postgres, caplog):
    database = f"test_pg_listen_{uuid.uuid4().hex[:8]}"
    channel, name = f"pg_listen_{uuid.uuid4().hex[:8]}", f"pg-listen-{uuid.uuid4().hex[:8]}"
    recorder = Recorder()
    listener = listener_for(postgres.dsn(database), recorder, channel, name)
    caplog.set_level(logging.WARNING, logger="emporium.pg_listen")
    task = asyncio.create_task(listener.run())
    try:
        # attempts at 0, 0.5 and 1.5 s: each one refused, logged, the hooks say it is not listening
        await asyncio.sleep(2.5)
        failures = [r for r in caplog.records if r.getMessage().startswith("test listener failed")]
        assert 2 <= len(failures) <= 4, [r.getMessage() for r in failures]
        assert database in failures[0].getMessage()
        assert recorder.connects == 0
        assert not task.done()

        await asyncio.to_thread(postgres.create_database, database)
        assert await eventually(lambda: recorder.connects == 1, 20), "the listener never connected"
        connection = await asyncpg.connect(postgres.dsn(database))
        try:
            await connection.execute("SELECT pg_notify($1, 'late')", channel)
            assert await asyncio.wait_for(recorder.payloads.get(), 5) == "late"
        finally:
            await connection.close()
    finally:
        listener.stop()
        await asyncio.wait_for(task, 5)
