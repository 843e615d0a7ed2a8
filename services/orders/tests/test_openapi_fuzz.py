"""Schemathesis against the orders service's OpenAPI (bounded): no request may produce a 5xx."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from emporium_common import testing
from emporium_common.migrations import upgrade_head
from emporium_orders.config import OrdersSettings
from emporium_orders.main import build_app
from emporium_products.config import ProductsSettings
from emporium_products.main import build_app as build_products

TOKEN = "fuzz-internal-token-0123456789"
SERVICES = Path(__file__).resolve().parents[2]
schema = schemathesis.openapi.from_dict(build_app(OrdersSettings(internal_token=TOKEN)).openapi())


@pytest.fixture(scope="module")
def fuzz_target(postgres):
    tokens = testing.TokenFactory()
    products_db = testing.create_test_database(postgres, "fuzz_ord_products")
    orders_db = testing.create_test_database(postgres, "fuzz_orders")
    upgrade_head(SERVICES / "products" / "alembic.ini", products_db)
    upgrade_head(SERVICES / "orders" / "alembic.ini", orders_db)
    products = testing.serve_in_thread(
        build_products(
            ProductsSettings(database_url=products_db, internal_token=TOKEN), token_verifier=tokens.verifier()
        )
    )
    admin = tokens.auth_header("fuzz-admin", roles=["admin"])
    for i in range(1, 4):  # a few products so generated orders can succeed, too
        body = {"name": f"Fuzz {i}", "price": "1.00", "stock_quantity": 1000, "sku": f"FUZZ-{i}"}
        httpx.post(f"{products[2]}/products", json=body, headers=admin, timeout=10).raise_for_status()
    orders = testing.serve_in_thread(
        build_app(
            OrdersSettings(database_url=orders_db, internal_token=TOKEN, products_url=products[2]),
            token_verifier=tokens.verifier(),
        )
    )
    yield orders[2], admin
    for server, thread, _ in (orders, products):
        server.should_exit = True
        thread.join(20)


@schema.parametrize()
@testing.fuzz_settings()
def test_no_server_errors(case, fuzz_target):
    testing.call_without_server_error(case, *fuzz_target)
