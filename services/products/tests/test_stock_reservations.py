"""The internal stock API: atomic, idempotent reservations that never oversell (real commits)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from emporium_common import testing

from .conftest import INTERNAL_TOKEN

INTERNAL = {"X-Internal-Token": INTERNAL_TOKEN}


@pytest.fixture
async def live(products_app):
    """A client whose requests commit (no rollback session): concurrency needs separate transactions."""
    async with testing.app_client(products_app) as client:
        yield client


async def new_product(live, admin, stock=10, **extra):
    body = {"name": "Widget", "price": "2.50", "stock_quantity": stock, "sku": f"W-{uuid.uuid4().hex[:10]}"}
    body.update(extra)
    response = await live.post("/products", json=body, headers=admin)
    assert response.status_code == 201, response.text
    return response.json()


async def reserve(live, lines, reservation_id=None, headers=INTERNAL):
    body = {"reservation_id": reservation_id or uuid.uuid4().hex, "lines": lines}
    return await live.post("/internal/stock/reservations", json=body, headers=headers)


async def stock_of(live, product_id):
    return (await live.get(f"/products/{product_id}")).json()["stock_quantity"]


async def test_internal_endpoints_need_the_service_token(live, admin):
    product = await new_product(live, admin)
    lines = [{"product_id": product["id"], "quantity": 1}]
    assert (await reserve(live, lines, headers={})).status_code == 403
    assert (await reserve(live, lines, headers={"X-Internal-Token": "wrong"})).status_code == 403
    assert (await reserve(live, lines, headers=admin)).status_code == 403
    assert await stock_of(live, product["id"]) == 10


async def test_reservation_returns_server_prices_and_merges_lines(live, admin):
    a = await new_product(live, admin, stock=5)
    b = await new_product(live, admin, stock=5, price="10.00", name="Gadget")
    response = await reserve(
        live,
        [
            {"product_id": b["id"], "quantity": 1},
            {"product_id": a["id"], "quantity": 2},
            {"product_id": a["id"], "quantity": 1},
        ],
    )
    assert response.status_code == 201, response.text
    lines = {line["product_id"]: line for line in response.json()["lines"]}
    assert lines[a["id"]]["quantity"] == 3 and lines[a["id"]]["price"] == "2.50"
    assert lines[b["id"]]["product_name"] == "Gadget" and lines[b["id"]]["price"] == "10.00"
    assert await stock_of(live, a["id"]) == 2 and await stock_of(live, b["id"]) == 4


async def test_all_or_nothing_and_clear_errors(live, admin):
    a = await new_product(live, admin, stock=5)
    b = await new_product(live, admin, stock=1)
    response = await reserve(
        live, [{"product_id": a["id"], "quantity": 2}, {"product_id": b["id"], "quantity": 2}]
    )
    assert response.status_code == 409
    assert (
        response.json()["detail"] == f"Insufficient stock for product {b['id']}. Available: 1, requested: 2"
    )
    assert await stock_of(live, a["id"]) == 5
    assert (await reserve(live, [{"product_id": 99999999, "quantity": 1}])).status_code == 404
    await live.delete(f"/products/{b['id']}", headers=admin)
    response = await reserve(live, [{"product_id": b["id"], "quantity": 1}])
    assert response.status_code == 409 and response.json()["code"] == "product_inactive"


async def test_reservation_is_idempotent_and_release_restocks_once(live, admin):
    product = await new_product(live, admin, stock=5)
    lines = [{"product_id": product["id"], "quantity": 2}]
    rid = uuid.uuid4().hex
    first = await reserve(live, lines, rid)
    again = await reserve(live, lines, rid)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json() == again.json()
    assert await stock_of(live, product["id"]) == 3
    different = await reserve(live, [{"product_id": product["id"], "quantity": 1}], rid)
    assert different.status_code == 409
    for _ in range(2):
        response = await live.post(f"/internal/stock/reservations/{rid}/release", headers=INTERNAL)
        assert response.status_code == 200 and response.json()["status"] == "released"
    assert await stock_of(live, product["id"]) == 5
    assert (await live.post("/internal/stock/reservations/nope/release", headers=INTERNAL)).status_code == 404


async def test_concurrent_reservations_never_oversell(products_app, admin):
    transport = httpx.ASGITransport(app=products_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as live:
        product = await new_product(live, admin, stock=10)
        results = await asyncio.wait_for(
            asyncio.gather(
                *(reserve(live, [{"product_id": product["id"], "quantity": 1}]) for _ in range(40))
            ),
            timeout=60,
        )
        codes = [r.status_code for r in results]
        assert codes.count(201) == 10 and codes.count(409) == 30
        assert await stock_of(live, product["id"]) == 0


async def test_released_reservation_can_be_reserved_again_and_stale_ones_are_listed(live, admin):
    product = await new_product(live, admin, stock=5)
    lines = [{"product_id": product["id"], "quantity": 2}]
    rid = uuid.uuid4().hex
    assert (await reserve(live, lines, rid)).status_code == 201
    stale = await live.get("/internal/stock/reservations", params={"older_than_seconds": 0}, headers=INTERNAL)
    assert rid in {r["reservation_id"] for r in stale.json()}
    fresh = await live.get(
        "/internal/stock/reservations", params={"older_than_seconds": 3600}, headers=INTERNAL
    )
    assert rid not in {r["reservation_id"] for r in fresh.json()}
    assert (await live.get("/internal/stock/reservations")).status_code == 403

    await live.post(f"/internal/stock/reservations/{rid}/release", headers=INTERNAL)
    assert await stock_of(live, product["id"]) == 5
    again = await reserve(live, lines, rid)
    assert again.status_code == 200 and again.json()["status"] == "reserved"
    assert await stock_of(live, product["id"]) == 3
    assert (await reserve(live, lines, rid)).status_code == 200
    assert await stock_of(live, product["id"]) == 3
