"""The catalogue API against a real Postgres (each test in a rolled-back transaction)."""

from __future__ import annotations

import uuid

import pytest


def product_body(**overrides):
    body = {
        "name": "Blue mug",
        "description": "A mug",
        "price": "29.99",
        "stock_quantity": 10,
        "sku": f"mug-{uuid.uuid4().hex[:8]}",
        "category": "kitchen",
    }
    body.update(overrides)
    return body


async def create(client, admin, **overrides):
    response = await client.post("/products", json=product_body(**overrides), headers=admin)
    assert response.status_code == 201, response.text
    return response.json()


async def test_create_and_get_product_serialises_price_as_string(client, admin):
    created = await create(client, admin, sku="  ab-c1 ")
    assert created["price"] == "29.99"
    assert created["sku"] == "AB-C1"
    assert created["is_active"] is True
    response = await client.get(f"/products/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created


async def test_writes_require_admin(client, customer, admin):
    assert (await client.post("/products", json=product_body())).status_code == 401
    assert (await client.post("/products", json=product_body(), headers=customer)).status_code == 403
    product = await create(client, admin)
    pid = product["id"]
    for method, path, body in [
        ("PUT", f"/products/{pid}", product_body()),
        ("PATCH", f"/products/{pid}", {"name": "Other"}),
        ("DELETE", f"/products/{pid}", None),
        ("PATCH", f"/products/{pid}/stock", {"stock_quantity": 1}),
    ]:
        response = await client.request(method, path, json=body, headers=customer)
        assert response.status_code == 403, (method, path)


async def test_duplicate_sku_is_409(client, admin):
    await create(client, admin, sku="DUP-1")
    response = await client.post("/products", json=product_body(sku="dup-1"), headers=admin)
    assert response.status_code == 409
    assert response.json()["detail"] == "SKU already exists"


@pytest.mark.parametrize(
    "overrides",
    [
        {"price": "0"},
        {"price": "1.234"},
        {"price": "100000000.00"},
        {"price": "NaN"},
        {"name": "ab"},
        {"name": "x" * 201},
        {"description": "x" * 1001},
        {"stock_quantity": -1},
        {"sku": " a "},
        {"name": "bad\x00name"},
    ],
)
async def test_invalid_product_is_422(client, admin, overrides):
    response = await client.post("/products", json=product_body(**overrides), headers=admin)
    assert response.status_code == 422, response.text


async def test_patch_applies_only_sent_fields_and_refuses_null(client, admin):
    product = await create(client, admin, category="tools")
    response = await client.patch(f"/products/{product['id']}", json={"price": 5}, headers=admin)
    assert response.status_code == 200
    assert response.json()["price"] == "5.00"
    assert response.json()["category"] == "tools"
    response = await client.patch(f"/products/{product['id']}", json={"sku": None}, headers=admin)
    assert response.status_code == 422
    response = await client.patch(f"/products/{product['id']}", json={"category": None}, headers=admin)
    assert response.status_code == 200 and response.json()["category"] is None


async def test_put_replaces_but_keeps_is_active(client, admin):
    product = await create(client, admin)
    assert (await client.delete(f"/products/{product['id']}", headers=admin)).status_code == 204
    body = product_body(name="Replaced", sku=product["sku"], description=None)
    etag = (await client.get(f"/products/{product['id']}")).headers["ETag"]
    response = await client.put(f"/products/{product['id']}", json=body, headers=admin | {"If-Match": etag})
    assert response.status_code == 200
    data = response.json()
    assert data["name"] == "Replaced" and data["is_active"] is False and data["description"] is None


async def test_soft_delete_and_stock(client, admin):
    product = await create(client, admin)
    assert (await client.delete(f"/products/{product['id']}", headers=admin)).status_code == 204
    fetched = (await client.get(f"/products/{product['id']}")).json()
    assert fetched["is_active"] is False
    response = await client.patch(f"/products/{product['id']}/stock", json={"delta": -7}, headers=admin)
    assert response.status_code == 200 and response.json()["stock_quantity"] == 3
    assert (await client.patch("/products/999999/stock", json={"delta": 3}, headers=admin)).status_code == 404
    assert (
        await client.patch(
            f"/products/{product['id']}/stock", json={"delta": 1, "stock_quantity": 1}, headers=admin
        )
    ).status_code == 422
    assert (await client.get("/products/999999")).status_code == 404
    assert (await client.get("/products/99999999999")).status_code == 422


async def test_list_filters_sorts_and_paginates(client, admin):
    tag = uuid.uuid4().hex[:6]
    await create(client, admin, name=f"Alpha {tag}", price="3.00", category=f"c{tag}")
    await create(client, admin, name=f"Beta {tag}", price="1.00", category=f"c{tag}")
    gamma = await create(client, admin, name=f"Gamma {tag}", price="2.00", category=f"c{tag}")
    await client.delete(f"/products/{gamma['id']}", headers=admin)

    response = await client.get("/products", params={"category": f"c{tag}", "sort_by": "price"})
    body = response.json()
    assert body["total"] == 3 and body["limit"] == 20 and body["offset"] == 0
    assert [p["price"] for p in body["items"]] == ["1.00", "2.00", "3.00"]

    body = (
        await client.get(
            "/products", params={"category": f"c{tag}", "sort_by": "-name", "limit": 1, "offset": 1}
        )
    ).json()
    assert body["total"] == 3 and [p["name"] for p in body["items"]] == [f"Beta {tag}"]

    body = (await client.get("/products", params={"category": f"c{tag}", "is_active": "true"})).json()
    assert body["total"] == 2

    body = (await client.get("/products", params={"name": f"ETA {tag}"})).json()
    assert [p["name"] for p in body["items"]] == [f"Beta {tag}"]


async def test_name_search_escapes_wildcards(client, admin):
    tag = uuid.uuid4().hex[:6]
    await create(client, admin, name=f"100% cotton {tag}")
    await create(client, admin, name=f"100 cotton {tag}")
    body = (await client.get("/products", params={"name": f"100% cotton {tag}"})).json()
    assert [p["name"] for p in body["items"]] == [f"100% cotton {tag}"]
    body = (await client.get("/products", params={"name": "_"})).json()
    assert all("_" in p["name"] for p in body["items"])


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 101}, {"offset": -1}, {"sort_by": "stock"}, {"name": "a\x00b"}]
)
async def test_bad_list_params_are_422(client, params):
    assert (await client.get("/products", params=params)).status_code == 422


async def test_database_down_is_503(tokens):
    from emporium_common import testing
    from emporium_products.config import ProductsSettings
    from emporium_products.main import build_app
    from emporium_testbed.process import free_port

    app = build_app(
        ProductsSettings(database_url=f"postgresql://u:p@127.0.0.1:{free_port()}/nope"),
        token_verifier=tokens.verifier(),
    )
    async with testing.app_client(app) as client:
        response = await client.get("/products")
    await app.state.engine.dispose()
    assert response.status_code == 503 and response.json()["detail"] == "Database unavailable"
