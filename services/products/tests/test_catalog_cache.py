"""The catalogue read cache: pages are served from memory only while nothing changed, whoever wrote."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import pytest
from emporium_common import testing
from emporium_products.catalog_cache import APPLICATION_NAME
from emporium_products.config import ProductsSettings
from emporium_products.main import build_app

from .conftest import INTERNAL_TOKEN


@pytest.fixture
async def served(products_db, tokens):
    app = build_app(
        ProductsSettings(database_url=products_db, internal_token=INTERNAL_TOKEN),
        token_verifier=tokens.verifier(),
    )
    server, thread, base_url = testing.serve_in_thread(app)
    try:
        cache = app.state.catalog_cache

        async def listening() -> bool:
            return cache.listening

        assert await _eventually(listening, 20), "the cache's LISTEN connection did not come up"
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            yield client, cache
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 10)


async def _eventually(check, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def test_pages_are_cached_until_any_writer_changes_a_product(served, admin, products_db):
    client, cache = served
    category = f"cache-{uuid.uuid4().hex[:8]}"
    page = f"/products?category={category}&limit=10"

    async def names() -> list[str]:
        response = await client.get(page)
        assert response.status_code == 200, response.text
        return [item["name"] for item in response.json()["items"]]

    async def create(name: str) -> dict:
        body = {"name": name, "price": "1.00", "stock_quantity": 5, "sku": f"C-{uuid.uuid4().hex[:10]}"}
        response = await client.post("/products", json=body | {"category": category}, headers=admin)
        assert response.status_code == 201, response.text
        return response.json()

    first = await create("first")
    assert await names() == ["first"]
    hits = cache.hits
    assert await names() == ["first"]
    assert cache.hits == hits + 1  # served from memory

    # This process's own write: the very next read sees it (no wait for the notification).
    await create("second")
    assert await names() == ["second", "first"]

    # A reservation (the orders service's path) changes the stock the page shows.
    body = {"reservation_id": uuid.uuid4().hex, "lines": [{"product_id": first["id"], "quantity": 2}]}
    reply = await client.post(
        "/internal/stock/reservations", json=body, headers={"X-Internal-Token": INTERNAL_TOKEN}
    )
    assert reply.status_code == 201, reply.text
    items = (await client.get(page)).json()["items"]
    assert [item["stock_quantity"] for item in items] == [5, 3]

    # Another writer (another replica, psql): the trigger's notification drops the page.
    assert await names() == await names()  # cached again
    connection = await asyncpg.connect(products_db)
    try:
        await connection.execute("UPDATE products SET name = 'renamed' WHERE id = $1", first["id"])

        async def renamed() -> bool:
            return await names() == ["second", "renamed"]

        assert await _eventually(renamed), await names()

        # Without its LISTEN connection the cache cannot know about changes: it stops serving.
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database()",
            APPLICATION_NAME,
        )

        async def deaf() -> bool:
            return not cache.listening

        assert await _eventually(deaf)
        await connection.execute("UPDATE products SET name = 'again' WHERE id = $1", first["id"])

        async def again() -> bool:
            return await names() == ["second", "again"]

        assert await _eventually(again), await names()

        async def listening_again() -> bool:
            return cache.listening

        assert await _eventually(listening_again, 15)  # it reconnects (and starts afresh)
        await connection.execute("UPDATE products SET name = 'third' WHERE id = $1", first["id"])

        async def third() -> bool:
            return await names() == ["second", "third"]

        assert await _eventually(third), await names()
    finally:
        await connection.close()
