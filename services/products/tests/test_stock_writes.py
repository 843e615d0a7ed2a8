"""Stock writes never undo reservations: deltas are atomic, absolute levels need a current If-Match."""

from __future__ import annotations

import uuid

from .conftest import INTERNAL_TOKEN
from .test_stock_reservations import live, new_product, reserve, stock_of  # noqa: F401 - fixture

INTERNAL = {"X-Internal-Token": INTERNAL_TOKEN}


async def test_absolute_stock_write_after_a_reservation_is_refused_as_stale(live, admin):  # noqa: F811
    product = await new_product(live, admin, stock=10)
    read = await live.get(f"/products/{product['id']}")
    etag = read.headers["ETag"]
    # A customer's order reserves 3 between the admin's read and write.
    assert (await reserve(live, [{"product_id": product["id"], "quantity": 3}])).status_code == 201
    path = f"/products/{product['id']}/stock"
    response = await live.patch(path, json={"stock_quantity": 10}, headers=admin | {"If-Match": etag})
    assert response.status_code == 412, response.text
    assert response.json()["code"] == "precondition_failed"
    assert await stock_of(live, product["id"]) == 7
    # Without If-Match an absolute level cannot be set at all (it would undo reservations blindly).
    response = await live.patch(path, json={"stock_quantity": 10}, headers=admin)
    assert response.status_code == 428 and response.json()["code"] == "precondition_required"
    # With the current ETag it is applied, and the ETag moves on.
    fresh = response_etag = (await live.get(f"/products/{product['id']}")).headers["ETag"]
    response = await live.patch(path, json={"stock_quantity": 20}, headers=admin | {"If-Match": fresh})
    assert response.status_code == 200 and response.json()["stock_quantity"] == 20
    assert response.headers["ETag"] != response_etag


async def test_stock_delta_is_atomic_and_never_below_zero(live, admin):  # noqa: F811
    product = await new_product(live, admin, stock=5)
    path = f"/products/{product['id']}/stock"
    assert (await reserve(live, [{"product_id": product["id"], "quantity": 2}])).status_code == 201
    response = await live.patch(path, json={"delta": 10}, headers=admin)
    assert response.status_code == 200 and response.json()["stock_quantity"] == 13
    response = await live.patch(path, json={"delta": -14}, headers=admin)
    assert response.status_code == 409 and response.json()["code"] == "insufficient_stock"
    response = await live.patch(path, json={"delta": -13}, headers=admin)
    assert response.status_code == 200 and response.json()["stock_quantity"] == 0


async def test_put_needs_a_current_if_match(live, admin):  # noqa: F811
    product = await new_product(live, admin, stock=10)
    body = {"name": "Widget 2", "price": "3.00", "stock_quantity": 10, "sku": product["sku"]}
    path = f"/products/{product['id']}"
    etag = (await live.get(path)).headers["ETag"]
    assert (await live.put(path, json=body, headers=admin)).status_code == 428
    assert (await reserve(live, [{"product_id": product["id"], "quantity": 4}])).status_code == 201
    response = await live.put(path, json=body, headers=admin | {"If-Match": etag})
    assert response.status_code == 412
    assert response.headers["ETag"] == (await live.get(path)).headers["ETag"]
    assert await stock_of(live, product["id"]) == 6
    # A PATCH of other fields needs no If-Match; a stale one is still refused.
    assert (await live.patch(path, json={"name": "Renamed"}, headers=admin)).status_code == 200
    assert (
        await live.patch(path, json={"name": "Again"}, headers=admin | {"If-Match": etag})
    ).status_code == 412
    assert (await live.patch(path, json={"stock_quantity": 1}, headers=admin)).status_code == 428


async def test_reservation_bounds_match_the_orders_bounds(live, admin):  # noqa: F811
    product = await new_product(live, admin, stock=100_000)
    lines = [{"product_id": product["id"], "quantity": 1000}] * 2
    response = await reserve(live, lines, reservation_id=uuid.uuid4().hex)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "lines"]
