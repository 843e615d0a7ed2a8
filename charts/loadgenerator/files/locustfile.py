"""Emporium's load generator: realistic shopper journeys through the ingress.

Anonymous visitors browse the catalog; shoppers register, log in, look at themselves, order and read
their notifications. Run it against `make up` (host http://127.0.0.1:8080) or, in a cluster, against the
ingress gateway (the loadgenerator chart does that).

    uv run locust -f charts/loadgenerator/files/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 10 -r 2 -t 1m
"""

from __future__ import annotations

import random
import uuid

from locust import HttpUser, between, task

CATEGORIES = ["kitchen", "apparel", "stationery", "home"]
SORTS = ["price", "-price", "name", "-created_at"]


class Visitor(HttpUser):
    """Browses without an account: listing, filtering, sorting, product pages."""

    weight = 3
    wait_time = between(1, 3)

    @task(5)
    def browse(self) -> None:
        self.client.get("/products", params={"limit": 20, "sort_by": random.choice(SORTS)}, name="/products")

    @task(3)
    def category(self) -> None:
        self.client.get("/products", params={"category": random.choice(CATEGORIES)}, name="/products?category")

    @task(2)
    def product_page(self) -> None:
        listing = self.client.get("/products", params={"limit": 20}, name="/products").json()
        if listing.get("items"):
            product = random.choice(listing["items"])
            self.client.get(f"/products/{product['id']}", name="/products/[id]")


class Shopper(HttpUser):
    """Registers, logs in, browses, orders what is in stock and reads its notifications."""

    weight = 1
    wait_time = between(2, 5)

    def on_start(self) -> None:
        name = f"load{uuid.uuid4().hex[:12]}"
        self.email = f"{name}@example.com"
        password = uuid.uuid4().hex
        self.client.post("/users/register", json={"email": self.email, "username": name, "password": password})
        login = self.client.post("/users/login", json={"email": self.email, "password": password})
        token = login.json()["access_token"] if login.ok else ""
        self.headers = {"Authorization": f"Bearer {token}"}

    @task(3)
    def browse(self) -> None:
        self.client.get("/products", params={"limit": 20}, name="/products")

    @task(1)
    def me(self) -> None:
        self.client.get("/users/me", headers=self.headers)

    @task(2)
    def order(self) -> None:
        listing = self.client.get("/products", params={"limit": 50, "is_active": "true"}, name="/products").json()
        in_stock = [p for p in listing.get("items", []) if p["stock_quantity"] > 0]
        if not in_stock:
            return
        product = random.choice(in_stock)
        with self.client.post(
            "/orders",
            json={"items": [{"product_id": product["id"], "quantity": 1}]},
            headers={**self.headers, "Idempotency-Key": uuid.uuid4().hex},
            catch_response=True,
        ) as response:
            if response.status_code == 400:  # sold out between listing and ordering: not a failure
                response.success()

    @task(2)
    def orders_and_notifications(self) -> None:
        self.client.get("/orders", headers=self.headers)
        self.client.get("/notifications", headers=self.headers)
