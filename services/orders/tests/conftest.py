from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from emporium_common import testing
from emporium_orders.config import OrdersSettings
from emporium_orders.main import build_app as build_orders
from emporium_products.config import ProductsSettings
from emporium_products.main import build_app as build_products

HERE = Path(__file__).resolve()
ORDERS_INI = HERE.parents[1] / "alembic.ini"
PRODUCTS_INI = HERE.parents[2] / "products" / "alembic.ini"
INTERNAL_TOKEN = "orders-test-internal-token-0123"


@pytest.fixture(scope="session")
def tokens() -> testing.TokenFactory:
    return testing.TokenFactory()


@pytest.fixture(scope="session")
async def products_app(postgres, tokens):
    url = testing.create_test_database(postgres, "ord_products")
    await testing.migrate(PRODUCTS_INI, url)
    app = build_products(
        ProductsSettings(database_url=url, internal_token=INTERNAL_TOKEN), token_verifier=tokens.verifier()
    )
    yield app
    await app.state.engine.dispose()


@pytest.fixture(scope="session")
async def orders_db(postgres) -> str:
    url = testing.create_test_database(postgres, "orders")
    await testing.migrate(ORDERS_INI, url)
    return url


@pytest.fixture(scope="session")
async def orders_app(orders_db, products_app, tokens):
    settings = OrdersSettings(
        database_url=orders_db, internal_token=INTERNAL_TOKEN, products_url="http://products"
    )
    app = build_orders(
        settings, token_verifier=tokens.verifier(), products_transport=httpx.ASGITransport(app=products_app)
    )
    yield app
    await app.state.engine.dispose()


@pytest.fixture
async def products(products_app):
    async with testing.app_client(products_app) as client:
        yield client


@pytest.fixture
async def orders(orders_app):
    async with testing.app_client(orders_app) as client:
        yield client


@pytest.fixture
def admin(tokens) -> dict[str, str]:
    return tokens.auth_header("admin-1", roles=["admin"], email="admin@example.com")


@pytest.fixture
def alice(tokens) -> dict[str, str]:
    return tokens.auth_header(f"alice-{uuid.uuid4().hex[:6]}", roles=["customer"], email="alice@example.com")


@pytest.fixture
def bob(tokens) -> dict[str, str]:
    return tokens.auth_header(f"bob-{uuid.uuid4().hex[:6]}", roles=["customer"], email="bob@example.com")


@pytest.fixture
def make_product(products, admin):
    async def make(stock: int = 10, price: str = "9.99", **extra):
        body = {"name": "Thing", "price": price, "stock_quantity": stock, "sku": f"T-{uuid.uuid4().hex[:10]}"}
        body.update(extra)
        response = await products.post("/products", json=body, headers=admin)
        assert response.status_code == 201, response.text
        return response.json()

    return make


@pytest.fixture
def stock_of(products):
    async def get(product_id: int) -> int:
        return (await products.get(f"/products/{product_id}")).json()["stock_quantity"]

    return get
