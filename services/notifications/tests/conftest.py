"""The whole event path on the test bed: products + orders (+ outbox relay) + notifications (consumer,
mailer, websocket) served by uvicorn on loopback, RabbitMQ with the charts' topology files declared by the
operator's own planner and applier (emporium_operator.rabbit: same queue types, policies, dead-letter
shorthand and permissions as in Kubernetes), the SMTP sink. Services connect to the broker as the
least-privilege users from those files."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import uvicorn
import yaml
from emporium_common import testing
from emporium_notifications.config import NotificationsSettings
from emporium_notifications.main import build_app as build_notifications
from emporium_operator.rabbit import RabbitAdmin, desired_topology, ensure_topology
from emporium_orders.config import OrdersSettings
from emporium_orders.main import build_app as build_orders
from emporium_products.config import ProductsSettings
from emporium_products.main import build_app as build_products
from emporium_testbed.process import free_port

HERE = Path(__file__).resolve()
SERVICES = HERE.parents[2]
REPO = HERE.parents[3]
INTERNAL_TOKEN = "notif-test-internal-token-0123"
VHOST = "emporium-test"


def topology_file(service: str) -> Path:
    return REPO / "charts" / service / "files" / "rabbit-topology.yaml"


@dataclass
class Served:
    app: object
    server: uvicorn.Server
    task: asyncio.Task
    url: str

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 20)


async def serve(app) -> Served:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on", ws="websockets")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    assert server.started, "uvicorn did not start"
    return Served(app, server, task, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="session")
def tokens() -> testing.TokenFactory:
    return testing.TokenFactory()


async def declare_topology(rabbitmq, service: str, vhost: str = VHOST) -> str:
    """Declare charts/<service>/files/rabbit-topology.yaml like the operator does; returns the user's URL."""
    spec = yaml.safe_load(topology_file(service).read_text())
    spec["vhost"] = vhost
    password = secrets.token_urlsafe(16)
    want = desired_topology(spec, service, password)
    async with RabbitAdmin(rabbitmq.management_url, rabbitmq.admin_user, rabbitmq.admin_password) as api:
        await api.put_vhost(vhost, "notifications tests")
        await ensure_topology(api, want, {}, allow_queue_delete=False)
    return rabbitmq.url_for(want.user, password, vhost)


@pytest.fixture(scope="session")
async def broker(rabbitmq):
    """The three services' topology files declared on a vhost; returns {service: amqp_url} for their users."""
    urls = {
        service: await declare_topology(rabbitmq, service) for service in ("users", "orders", "notifications")
    }
    urls["admin"] = rabbitmq.url_for(rabbitmq.admin_user, rabbitmq.admin_password, VHOST)
    return urls


class Queues:
    """Queue inspection through the management API (admin)."""

    def __init__(self, rabbitmq) -> None:
        self.rabbitmq = rabbitmq

    def purge(self, queue: str) -> None:
        self.rabbitmq.api("DELETE", f"/api/queues/{quote(VHOST, safe='')}/{quote(queue, safe='')}/contents")

    def queue_info(self, queue: str) -> dict:
        return self.rabbitmq.api("GET", f"/api/queues/{quote(VHOST, safe='')}/{quote(queue, safe='')}")


@pytest.fixture(scope="session")
def declarer(rabbitmq, broker) -> Queues:
    return Queues(rabbitmq)


@pytest.fixture(scope="session")
async def notifications_db(postgres) -> str:
    url = testing.create_test_database(postgres, "notifications")
    await testing.migrate(SERVICES / "notifications" / "alembic.ini", url)
    return url


@pytest.fixture(scope="session")
def notifications_settings(notifications_db, broker, smtp_sink) -> NotificationsSettings:
    return NotificationsSettings(
        database_url=notifications_db,
        amqp_url=broker["notifications"],
        smtp_host=smtp_sink.host,
        smtp_port=smtp_sink.port,
        event_retry_base_seconds=0.05,
        mail_retry_base_seconds=0.2,
    )


@pytest.fixture(scope="session")
async def stack(postgres, broker, notifications_settings, tokens):
    """products, orders and notifications, each a uvicorn server on loopback."""
    products_url = testing.create_test_database(postgres, "e2e_products")
    orders_url = testing.create_test_database(postgres, "e2e_orders")
    await testing.migrate(SERVICES / "products" / "alembic.ini", products_url)
    await testing.migrate(SERVICES / "orders" / "alembic.ini", orders_url)
    verifier = tokens.verifier()
    products = await serve(
        build_products(
            ProductsSettings(database_url=products_url, internal_token=INTERNAL_TOKEN),
            token_verifier=verifier,
        )
    )
    orders = await serve(
        build_orders(
            OrdersSettings(
                database_url=orders_url,
                amqp_url=broker["orders"],
                products_url=products.url,
                internal_token=INTERNAL_TOKEN,
                outbox_poll_seconds=0.2,
            ),
            token_verifier=verifier,
        )
    )
    notifications = await serve(build_notifications(notifications_settings, token_verifier=verifier))
    stack = {"products": products, "orders": orders, "notifications": notifications, "orders_db": orders_url}
    consumer = notifications.app.state.consumer
    await asyncio.wait_for(consumer.connected.wait(), 30)
    await asyncio.wait_for(notifications.app.state.listener.listening.wait(), 30)
    yield stack
    for served in (notifications, orders, products):
        await served.stop()


@pytest.fixture
def admin(tokens) -> dict[str, str]:
    return tokens.auth_header("admin-1", roles=["admin"], email="admin@example.com")


def new_user(tokens, name: str = "user") -> tuple[str, str, dict[str, str]]:
    sub = f"{name}-{uuid.uuid4().hex[:8]}"
    email = f"{sub}@example.com"
    return sub, email, tokens.auth_header(sub, email=email)
