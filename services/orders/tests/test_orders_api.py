"""Orders against real Postgres databases (orders and products), products reached over its HTTP API."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from emporium_common import testing
from sqlalchemy import text


async def test_place_order_uses_server_prices_and_merges_lines(orders, alice, make_product, stock_of):
    a = await make_product(stock=5, price="2.50", name="Apple")
    b = await make_product(stock=5, price="10.00", name="Banana")
    body = {
        "items": [
            {"product_id": a["id"], "quantity": 1, "price": "0.01"},
            {"product_id": b["id"], "quantity": 2},
            {"product_id": a["id"], "quantity": 2},
        ]
    }
    response = await orders.post("/orders", json=body, headers=alice)
    assert response.status_code == 201, response.text
    order = response.json()
    assert order["status"] == "pending"
    assert order["total_amount"] == "27.50"
    items = {item["product_id"]: item for item in order["items"]}
    assert items[a["id"]]["quantity"] == 3 and items[a["id"]]["product_price"] == "2.50"
    assert items[a["id"]]["subtotal"] == "7.50" and items[a["id"]]["product_name"] == "Apple"
    assert await stock_of(a["id"]) == 2 and await stock_of(b["id"]) == 3


async def test_order_errors_are_clear_4xx(orders, alice, admin, make_product, products, stock_of):
    p = await make_product(stock=1)
    response = await orders.post(
        "/orders", json={"items": [{"product_id": p["id"], "quantity": 2}]}, headers=alice
    )
    assert response.status_code == 400
    assert (
        response.json()["detail"] == f"Insufficient stock for product {p['id']}. Available: 1, requested: 2"
    )
    response = await orders.post(
        "/orders", json={"items": [{"product_id": 2_000_000_000, "quantity": 1}]}, headers=alice
    )
    assert response.status_code == 404 and response.json()["detail"] == "Product 2000000000 not found"
    await products.delete(f"/products/{p['id']}", headers=admin)
    response = await orders.post(
        "/orders", json={"items": [{"product_id": p["id"], "quantity": 1}]}, headers=alice
    )
    assert response.status_code == 400 and response.json()["code"] == "product_inactive"
    assert await stock_of(p["id"]) == 1
    assert (await orders.post("/orders", json={"items": []}, headers=alice)).status_code == 422
    assert (
        await orders.post("/orders", json={"items": [{"product_id": 1, "quantity": 0}]}, headers=alice)
    ).status_code == 422
    assert (
        await orders.post("/orders", json={"items": [{"product_id": p["id"], "quantity": 1}]})
    ).status_code == 401


async def test_list_and_get_are_per_user(orders, alice, bob, make_product):
    p = await make_product(stock=10)
    ids = []
    for _ in range(3):
        response = await orders.post(
            "/orders", json={"items": [{"product_id": p["id"], "quantity": 1}]}, headers=alice
        )
        ids.append(response.json()["id"])
    listed = (await orders.get("/orders", headers=alice)).json()
    assert [o["id"] for o in listed] == ids[::-1]
    assert [
        o["id"] for o in (await orders.get("/orders", params={"skip": 1, "limit": 1}, headers=alice)).json()
    ] == [ids[1]]
    assert (await orders.get("/orders", headers=bob)).json() == []
    assert (await orders.get(f"/orders/{ids[0]}", headers=alice)).status_code == 200
    response = await orders.get(f"/orders/{ids[0]}", headers=bob)
    assert response.status_code == 404 and response.json()["detail"] == f"Order {ids[0]} not found"


async def test_idempotency_key_makes_retries_safe(orders, alice, make_product, stock_of, orders_db):
    p = await make_product(stock=10)
    key = uuid.uuid4().hex
    body = {"items": [{"product_id": p["id"], "quantity": 2}]}
    headers = {**alice, "Idempotency-Key": key}
    first, second = await asyncio.gather(
        orders.post("/orders", json=body, headers=headers), orders.post("/orders", json=body, headers=headers)
    )
    third = await orders.post("/orders", json=body, headers=headers)
    assert {first.status_code, second.status_code, third.status_code} == {201}
    assert first.json()["id"] == second.json()["id"] == third.json()["id"]
    assert third.headers["Idempotent-Replayed"] == "true"
    assert await stock_of(p["id"]) == 8
    other = await orders.post(
        "/orders", json={"items": [{"product_id": p["id"], "quantity": 1}]}, headers=headers
    )
    assert other.status_code == 422
    async with testing.engine_for(orders_db) as engine, engine.connect() as conn:
        count = (
            await conn.execute(text("SELECT count(*) FROM orders WHERE idempotency_key = :k"), {"k": key})
        ).scalar()
        events = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM outbox WHERE type = 'order.created'"
                    " AND (payload->'data'->>'order_id')::int = :id"
                ),
                {"id": first.json()["id"]},
            )
        ).scalar()
    assert count == 1 and events == 1


async def test_fifty_concurrent_orders_for_stock_ten(orders, tokens, make_product, stock_of, orders_db):
    p = await make_product(stock=10)

    async def place(i: int) -> httpx.Response:
        headers = tokens.auth_header(f"buyer-{i}-{uuid.uuid4().hex[:4]}")
        return await orders.post(
            "/orders", json={"items": [{"product_id": p["id"], "quantity": 1}]}, headers=headers
        )

    responses = await asyncio.wait_for(asyncio.gather(*(place(i) for i in range(50))), timeout=120)
    codes = [r.status_code for r in responses]
    assert codes.count(201) == 10, codes
    assert codes.count(400) == 40, codes
    assert await stock_of(p["id"]) == 0
    async with testing.engine_for(orders_db) as engine, engine.connect() as conn:
        stored = (
            await conn.execute(text("SELECT count(*) FROM order_items WHERE product_id = :p"), {"p": p["id"]})
        ).scalar()
    assert stored == 10


async def place(orders, headers, product_id, quantity=1):
    response = await orders.post(
        "/orders", json={"items": [{"product_id": product_id, "quantity": quantity}]}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()


async def set_status(orders, headers, order_id, status):
    return await orders.patch(f"/orders/{order_id}/status", json={"status": status}, headers=headers)


async def test_admin_drives_the_state_machine(orders, alice, admin, make_product):
    p = await make_product(stock=10)
    order = await place(orders, alice, p["id"])
    assert (await set_status(orders, admin, order["id"], "shipped")).status_code == 409
    assert (await set_status(orders, admin, order["id"], "pending")).status_code == 409
    for status in ("confirmed", "shipped", "delivered"):
        response = await set_status(orders, admin, order["id"], status)
        assert response.status_code == 200 and response.json()["status"] == status
    for status in ("cancelled", "pending", "shipped", "delivered"):
        response = await set_status(orders, admin, order["id"], status)
        assert response.status_code == 409
        assert response.json()["detail"] == f"Cannot change order status from delivered to {status}"
    assert (await set_status(orders, admin, order["id"], "bogus")).status_code == 422


@pytest.mark.parametrize("status", ["confirmed", "shipped", "delivered", "pending"])
async def test_customers_cannot_drive_their_orders(orders, alice, make_product, status):
    p = await make_product(stock=10)
    order = await place(orders, alice, p["id"])
    assert (await set_status(orders, alice, order["id"], status)).status_code == 403


async def test_customer_cancels_own_pending_order_and_stock_returns(
    orders, alice, bob, admin, make_product, stock_of, orders_db
):
    p = await make_product(stock=5)
    order = await place(orders, alice, p["id"], 3)
    assert await stock_of(p["id"]) == 2
    assert (await set_status(orders, bob, order["id"], "cancelled")).status_code == 404
    response = await set_status(orders, alice, order["id"], "cancelled")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert await stock_of(p["id"]) == 5
    assert (await set_status(orders, alice, order["id"], "cancelled")).status_code == 409
    assert await stock_of(p["id"]) == 5

    confirmed = await place(orders, alice, p["id"], 1)
    assert (await set_status(orders, admin, confirmed["id"], "confirmed")).status_code == 200
    assert (await set_status(orders, alice, confirmed["id"], "cancelled")).status_code == 409
    assert (await set_status(orders, admin, confirmed["id"], "cancelled")).status_code == 200
    assert await stock_of(p["id"]) == 5
    async with testing.engine_for(orders_db) as engine, engine.connect() as conn:
        events = (
            await conn.execute(
                text(
                    "SELECT payload->'data'->>'old_status', payload->'data'->>'new_status' FROM outbox"
                    " WHERE type = 'order.status.updated'"
                    " AND (payload->'data'->>'order_id')::int = :id ORDER BY id"
                ),
                {"id": confirmed["id"]},
            )
        ).all()
    assert [tuple(e) for e in events] == [("pending", "confirmed"), ("confirmed", "cancelled")]


async def test_cancel_endpoint_follows_the_same_rules(orders, alice, bob, admin, make_product, stock_of):
    p = await make_product(stock=4)
    order = await place(orders, alice, p["id"], 2)
    assert (await orders.post(f"/orders/{order['id']}/cancel", headers=bob)).status_code == 404
    cancelled = await orders.post(f"/orders/{order['id']}/cancel", headers=alice)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert await stock_of(p["id"]) == 4
    assert (await orders.post(f"/orders/{order['id']}/cancel", headers=alice)).status_code == 409

    confirmed = await place(orders, alice, p["id"], 1)
    assert (await set_status(orders, admin, confirmed["id"], "confirmed")).status_code == 200
    assert (await orders.post(f"/orders/{confirmed['id']}/cancel", headers=alice)).status_code == 409
    assert (await orders.post(f"/orders/{confirmed['id']}/cancel", headers=admin)).status_code == 200
    assert await stock_of(p["id"]) == 4


async def test_products_unreachable_is_503(orders_db, tokens, make_product):
    from emporium_orders.config import OrdersSettings
    from emporium_orders.main import build_app

    p = await make_product(stock=3)
    settings = OrdersSettings(
        database_url=orders_db, internal_token="x" * 20, products_url="http://127.0.0.1:9"
    )
    app = build_app(settings, token_verifier=tokens.verifier())
    async with testing.app_client(app) as client:
        response = await client.post(
            "/orders",
            json={"items": [{"product_id": p["id"], "quantity": 1}]},
            headers=tokens.auth_header("z"),
        )
    await app.state.engine.dispose()
    await app.state.products.aclose()
    assert response.status_code == 503 and response.json()["detail"] == "Product service unavailable"


async def test_reaper_releases_reservations_that_never_became_orders(
    orders, orders_app, products, alice, make_product, stock_of
):
    from emporium_orders.reaper import ReservationReaper

    from .conftest import INTERNAL_TOKEN

    p = await make_product(stock=10)
    await place(orders, alice, p["id"], 2)  # a real order: its reservation stays
    orphan = await products.post(
        "/internal/stock/reservations",
        json={"reservation_id": uuid.uuid4().hex, "lines": [{"product_id": p["id"], "quantity": 3}]},
        headers={"X-Internal-Token": INTERNAL_TOKEN},
    )
    assert orphan.status_code == 201
    assert await stock_of(p["id"]) == 5
    reaper = ReservationReaper(orders_app.state.engine, orders_app.state.products, grace_seconds=0)
    assert await reaper.run_once() >= 1
    assert await stock_of(p["id"]) == 8
    assert await reaper.run_once() == 0
    assert await stock_of(p["id"]) == 8
