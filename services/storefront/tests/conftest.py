"""The storefront against fake upstream services (httpx.MockTransport): fast, and every call is seen.

The real services behind the real ingress, in a real browser, are in tests/e2e/test_storefront_browser.py.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from emporium_storefront.config import StorefrontSettings
from emporium_storefront.main import build_app


def fake_token(sub: str = "7", roles: tuple[str, ...] = ("customer",), ttl: int = 900) -> str:
    claims = {
        "sub": sub,
        "email": f"user{sub}@example.com",
        "roles": list(roles),
        "exp": int(time.time()) + ttl,
    }
    return jwt.encode(claims, "not-a-real-key-but-long-enough-for-hs256", algorithm="HS256")


PRODUCTS = [
    {
        "id": i,
        "name": f"Product {i}",
        "description": "A thing",
        "price": f"{i}.50",
        "stock_quantity": 5,
        "sku": f"SKU-{i}",
        "category": "kitchen" if i % 2 else "garden",
        "is_active": True,
    }
    for i in range(1, 31)
]


@dataclass
class FakeShop:
    """The four services as the storefront sees them; records every request."""

    calls: list[httpx.Request] = field(default_factory=list)
    orders: dict[str, dict] = field(default_factory=dict)  # idempotency key -> order
    refreshes: int = 0
    down: set[str] = field(default_factory=set)
    access_ttl: int = 900
    roles: tuple[str, ...] = ("customer",)
    issued: list[str] = field(default_factory=list)  # every access and refresh token handed out
    providers: list[dict] = field(default_factory=list)  # the users service's OpenID Connect providers
    login_codes: set[str] = field(default_factory=set)  # one-time codes its callback would hand out
    versions: dict[int, int] = field(default_factory=dict)  # product id -> version (its ETag)
    stock_writes: list[int] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        host = request.url.host
        if host in self.down:
            raise httpx.ConnectError("refused", request=request)
        path, method = request.url.path, request.method
        if host == "products" and path == "/products":
            return httpx.Response(
                200, json={"items": PRODUCTS[:12], "total": len(PRODUCTS), "limit": 12, "offset": 0}
            )
        if host == "products" and (m := re.fullmatch(r"/products/(\d+)", path)):
            found = [p for p in PRODUCTS if p["id"] == int(m[1])]
            if not found:
                return httpx.Response(404, json={"detail": "x"})
            etag = f'"{m[1]}-{self.versions.get(int(m[1]), 0)}"'
            return httpx.Response(200, json=found[0], headers={"ETag": etag})
        if host == "products" and (m := re.fullmatch(r"/products/(\d+)/stock", path)) and method == "PATCH":
            # the products service: an absolute level needs If-Match with the current ETag
            current = f'"{m[1]}-{self.versions.get(int(m[1]), 0)}"'
            if "If-Match" not in request.headers:
                return httpx.Response(428, json={"detail": "needs If-Match", "code": "precondition_required"})
            if request.headers["If-Match"] != current:
                return httpx.Response(412, json={"detail": "changed", "code": "precondition_failed"})
            self.stock_writes.append(json.loads(request.content)["stock_quantity"])
            return httpx.Response(200, json={"id": int(m[1])})
        if host == "users" and path == "/users/login":
            body = {
                "access_token": fake_token(roles=self.roles, ttl=self.access_ttl),
                "refresh_token": "refresh-1",
            }
            self.issued += body.values()
            return httpx.Response(200, json={**body, "token_type": "bearer", "expires_in": self.access_ttl})
        if host == "users" and path == "/users/refresh":
            self.refreshes += 1
            time.sleep(0.05)
            body = {
                "access_token": fake_token(roles=self.roles),
                "refresh_token": f"refresh-{self.refreshes + 1}",
            }
            self.issued += body.values()
            return httpx.Response(200, json={**body, "expires_in": 900})
        if host == "users" and path == "/auth/oidc/providers":
            return httpx.Response(200, json=self.providers)
        if host == "users" and path == "/auth/oidc/token":
            code = json.loads(request.content)["code"]
            if code not in self.login_codes:
                return httpx.Response(400, json={"detail": "Unknown login code", "code": "oidc_invalid_code"})
            self.login_codes.discard(code)
            body = {"access_token": fake_token(roles=self.roles), "refresh_token": "refresh-oidc"}
            self.issued += body.values()
            return httpx.Response(200, json={**body, "token_type": "bearer", "expires_in": 900})
        if host == "users" and path == "/users/me":
            return httpx.Response(200, json={"id": 7, "email": "user7@example.com", "username": "ann"})
        if host == "users" and path == "/users/logout":
            return httpx.Response(204)
        if host == "orders" and path == "/orders" and method == "POST":
            key = request.headers["Idempotency-Key"]
            created = key not in self.orders
            self.orders.setdefault(
                key, {"id": len(self.orders) + 1, "status": "pending", "total_amount": "1.50", "items": []}
            )
            return httpx.Response(
                201, json=self.orders[key], headers={} if created else {"Idempotent-Replayed": "true"}
            )
        if host == "orders" and path == "/orders":
            return httpx.Response(200, json=list(self.orders.values()))
        return httpx.Response(404, json={"detail": "Not found", "code": "not_found"})


@pytest.fixture
def shop() -> FakeShop:
    return FakeShop()


def make_client(shop: FakeShop, **settings: Any) -> httpx.AsyncClient:
    app = build_app(StorefrontSettings(**settings), transport=httpx.MockTransport(shop))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop.test")


@pytest.fixture
async def client(shop):
    async with make_client(shop) as client:
        yield client


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html)[1]


async def sign_in(client: httpx.AsyncClient) -> None:
    token = csrf_of((await client.get("/login")).text)
    response = await client.post(
        "/login", data={"csrf_token": token, "email": "user7@example.com", "password": "pw", "next": "/"}
    )
    assert response.status_code == 303, response.text
