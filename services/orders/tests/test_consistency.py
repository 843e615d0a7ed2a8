"""Orders and products stay consistent when things fail half way (issue 12): limits agreed between the
services, releases only once nothing can still hold the stock, idempotency edge cases, a reaper that
survives restarts."""

from __future__ import annotations

import uuid

import httpx
import pytest
import sqlalchemy as sa
from emporium_common import get_session, testing
from emporium_orders.config import OrdersSettings
from emporium_orders.main import build_app as build_orders
from emporium_orders.reaper import ReservationReaper
from emporium_orders.service import RESERVATION_NAMESPACE
from sqlalchemy.exc import OperationalError
from sqlmodel.ext.asyncio.session import AsyncSession

from .conftest import INTERNAL_TOKEN

INTERNAL = {"X-Internal-Token": INTERNAL_TOKEN}


class Proxy(httpx.AsyncBaseTransport):
    """The products app over ASGI, with a hook run before each request is forwarded."""

    def __init__(self, app, before=None) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.before = before

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.before is not None:
            answer = await self.before(request)
            if answer is not None:
                return answer
        return await self.inner.handle_async_request(request)


@pytest.fixture
async def make_orders_app(orders_db, tokens):
    apps = []

    def make(transport, session_class=None):
        settings = OrdersSettings(
            database_url=orders_db, internal_token=INTERNAL_TOKEN, products_url="http://products"
        )
        app = build_orders(settings, token_verifier=tokens.verifier(), products_transport=transport)
        if session_class is not None:

            async def session():
                async with session_class(app.state.engine, expire_on_commit=False) as s:
                    yield s

            app.dependency_overrides[get_session] = session
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.state.products.aclose()
        await app.state.engine.dispose()


async def order_row(orders_db, order_id):
    async with testing.engine_for(orders_db) as engine, engine.connect() as conn:
        return (
            await conn.execute(sa.text("SELECT * FROM orders WHERE id = :i"), {"i": order_id})
        ).one_or_none()


async def test_eleven_lines_of_1000_of_one_product_is_422_naming_items(orders, alice, make_product, stock_of):
    p = await make_product(stock=100_000)
    body = {"items": [{"product_id": p["id"], "quantity": 1000}] * 11}
    response = await orders.post("/orders", json=body, headers=alice)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "items"]
    assert "at most 1000 per product" in response.json()["detail"][0]["msg"]
    assert await stock_of(p["id"]) == 100_000
    # The limit itself is accepted end to end (products takes what orders takes).
    body = {"items": [{"product_id": p["id"], "quantity": 500}] * 2}
    assert (await orders.post("/orders", json=body, headers=alice)).status_code == 201
    body = {"items": [{"product_id": p["id"] + i, "quantity": 1000} for i in range(51)]}
    assert (await orders.post("/orders", json=body, headers=alice)).status_code == 422


async def test_cancel_releases_stock_only_after_the_cancel_committed(
    products_app, make_orders_app, alice, make_product, stock_of, orders_db
):
    seen: list[str] = []

    async def before(request: httpx.Request):
        if request.url.path.endswith("/release"):
            reservation_id = request.url.path.split("/")[-2]
            async with testing.engine_for(orders_db) as engine, engine.connect() as conn:
                seen.append(
                    (
                        await conn.execute(
                            sa.text("SELECT status FROM orders WHERE reservation_id = :r"),
                            {"r": reservation_id},
                        )
                    ).scalar_one()
                )
        return None

    app = make_orders_app(Proxy(products_app, before))
    p = await make_product(stock=5)
    async with testing.app_client(app) as client:
        order = (
            await client.post(
                "/orders", json={"items": [{"product_id": p["id"], "quantity": 2}]}, headers=alice
            )
        ).json()
        response = await client.post(f"/orders/{order['id']}/cancel", headers=alice)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert seen == ["cancelled"]  # another connection already saw the cancel committed
    assert await stock_of(p["id"]) == 5
    assert (await order_row(orders_db, order["id"])).stock_released_at is not None


async def test_cancel_while_products_is_down_is_released_later_by_the_reaper(
    products_app, orders_app, make_orders_app, alice, make_product, stock_of, orders_db
):
    async def down(request: httpx.Request):
        if request.url.path.endswith("/release"):
            raise httpx.ConnectError("products is down")
        return None

    app = make_orders_app(Proxy(products_app, down))
    p = await make_product(stock=5)
    async with testing.app_client(app) as client:
        order = (
            await client.post(
                "/orders", json={"items": [{"product_id": p["id"], "quantity": 2}]}, headers=alice
            )
        ).json()
        response = await client.post(f"/orders/{order['id']}/cancel", headers=alice)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert await stock_of(p["id"]) == 3
    assert (await order_row(orders_db, order["id"])).stock_released_at is None
    reaper = ReservationReaper(orders_app.state.engine, orders_app.state.products, grace_seconds=3600)
    await reaper.run_once()
    assert await stock_of(p["id"]) == 5
    assert (await order_row(orders_db, order["id"])).stock_released_at is not None
    await reaper.run_once()
    assert await stock_of(p["id"]) == 5


class CommitOutcomeUnknown(AsyncSession):
    """COMMIT reaches the database, then the connection drops before the answer."""

    async def commit(self) -> None:
        await super().commit()
        raise OperationalError("COMMIT", {}, ConnectionResetError("connection lost"))


async def test_commit_with_an_unknown_outcome_never_releases(
    products_app, make_orders_app, alice, make_product, stock_of, orders_db
):
    app = make_orders_app(httpx.ASGITransport(app=products_app), CommitOutcomeUnknown)
    p = await make_product(stock=5)
    async with testing.app_client(app) as client:
        response = await client.post(
            "/orders", json={"items": [{"product_id": p["id"], "quantity": 2}]}, headers=alice
        )
    assert response.status_code == 503, response.text
    async with testing.engine_for(orders_db) as engine, engine.connect() as conn:
        stored = (
            await conn.execute(
                sa.text("SELECT count(*) FROM order_items WHERE product_id = :p"), {"p": p["id"]}
            )
        ).scalar()
    assert stored == 1  # the order was committed...
    assert await stock_of(p["id"]) == 3  # ...so its stock stays reserved


class FailingInsert(AsyncSession):
    """The order's INSERT fails with a lost connection (other statements run)."""

    async def execute(self, statement, *args, **kwargs):
        if "INSERT INTO orders" in str(statement):
            raise OperationalError("INSERT", {}, ConnectionResetError("connection lost"))
        return await super().execute(statement, *args, **kwargs)


async def test_a_failing_first_request_never_releases_what_its_retry_commits(
    products_app, orders_app, make_orders_app, alice, make_product, stock_of
):
    p = await make_product(stock=5)
    key = uuid.uuid4().hex
    body = {"items": [{"product_id": p["id"], "quantity": 2}]}
    headers = alice | {"Idempotency-Key": key}
    retried: list[httpx.Response] = []

    async def retry_meanwhile(request: httpx.Request):
        if request.url.path == "/internal/stock/reservations" and not retried:
            # The client gave up on the first request and retried it; the retry commits first.
            async with testing.app_client(orders_app) as client:
                retried.append(await client.post("/orders", json=body, headers=headers))
        return None

    first_app = make_orders_app(Proxy(products_app, retry_meanwhile), FailingInsert)
    async with testing.app_client(first_app) as client:
        first = await client.post("/orders", json=body, headers=headers)
    assert first.status_code == 503
    assert retried[0].status_code == 201
    assert await stock_of(p["id"]) == 3  # the retry's order still holds its stock


async def test_same_key_with_another_body_is_422_while_the_first_is_in_flight(
    orders, products, tokens, make_product
):
    p = await make_product(stock=5)
    key = uuid.uuid4().hex
    sub = f"carol-{uuid.uuid4().hex[:6]}"
    alice = tokens.auth_header(sub, roles=["customer"], email="carol@example.com")
    # The first request with this key has reserved, and not committed yet.
    reservation_id = uuid.uuid5(RESERVATION_NAMESPACE, f"{sub}\n{key}").hex
    first = await products.post(
        "/internal/stock/reservations",
        json={"reservation_id": reservation_id, "lines": [{"product_id": p["id"], "quantity": 1}]},
        headers=INTERNAL,
    )
    assert first.status_code == 201
    response = await orders.post(
        "/orders",
        json={"items": [{"product_id": p["id"], "quantity": 2}]},
        headers=alice | {"Idempotency-Key": key},
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "idempotency_key_reused"


async def test_reaper_cursor_survives_a_restart(orders_app, products_app, products, make_product, stock_of):
    p = await make_product(stock=10)
    old = uuid.uuid4().hex
    assert (
        await products.post(
            "/internal/stock/reservations",
            json={"reservation_id": old, "lines": [{"product_id": p["id"], "quantity": 3}]},
            headers=INTERNAL,
        )
    ).status_code == 201
    async with products_app.state.engine.begin() as conn:  # orphaned two hours ago
        await conn.execute(
            sa.text("UPDATE stock_reservations SET reserved_at = now() - interval '2 hours' WHERE id = :i"),
            {"i": old},
        )
    async with orders_app.state.engine.begin() as conn:
        await conn.execute(sa.text("DELETE FROM reaper_cursors"))
    # A reaper that just (re)started finds it although it is older than any window.
    reaper = ReservationReaper(orders_app.state.engine, orders_app.state.products, grace_seconds=60)
    assert await reaper.run_once() >= 1
    assert await stock_of(p["id"]) == 10
    cursor = await reaper.cursor()
    assert cursor[1] is not None
    # The next process resumes from the stored cursor.
    restarted = ReservationReaper(orders_app.state.engine, orders_app.state.products, grace_seconds=60)
    assert await restarted.cursor() == cursor
    assert await restarted.run_once() == 0
