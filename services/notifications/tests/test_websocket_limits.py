"""Websockets end with their token (close code 4401) and each user may hold only a few of them (4429)."""

import asyncio

import pytest
from emporium_notifications.config import NotificationsSettings
from emporium_notifications.main import build_app
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import serve


@pytest.fixture
async def served(tokens):
    settings = NotificationsSettings(
        database_url="postgresql://nobody:nothing@127.0.0.1:1/unused",  # the socket needs no database
        background_workers=False,
        websocket_max_per_user=2,
    )
    served = await serve(build_app(settings, token_verifier=tokens.verifier()))
    yield served.url.replace("http://", "ws://")
    await served.stop()


async def _closed_with(ws, within: float) -> tuple[int, str]:
    try:
        async with asyncio.timeout(within):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("still open")


async def test_a_socket_is_closed_when_its_token_expires(served, tokens):
    # Expired 8 s ago: still inside the 10 s leeway HTTP allows, so the socket opens, for about 2 s.
    token = tokens.token("31", ttl=-8)
    async with connect(f"{served}/ws/notifications?token={token}") as ws:
        assert "connected" in await ws.recv()
        code, reason = await _closed_with(ws, within=10)
    assert (code, reason) == (4401, "Token expired")


async def test_each_user_may_hold_only_a_few_sockets(served, tokens):
    url = f"{served}/ws/notifications?token="
    async with connect(url + tokens.token("32")) as first, connect(url + tokens.token("32")) as second:
        assert "connected" in await first.recv() and "connected" in await second.recv()
        async with connect(url + tokens.token("32")) as third:
            code, reason = await _closed_with(third, within=5)
        assert code == 4429 and "Too many" in reason
        async with connect(url + tokens.token("33")) as other:  # other users are not affected
            assert "connected" in await other.recv()
    # Closing one frees its place.
    async with connect(url + tokens.token("32")) as again:
        assert "connected" in await again.recv()
