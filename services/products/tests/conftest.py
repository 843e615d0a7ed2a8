from __future__ import annotations

from pathlib import Path

import pytest
from emporium_common import testing
from emporium_products.config import ProductsSettings
from emporium_products.main import build_app

ALEMBIC_INI = Path(__file__).resolve().parents[1] / "alembic.ini"
INTERNAL_TOKEN = "test-internal-token-0123456789"


@pytest.fixture(scope="session")
async def products_db(postgres) -> str:
    url = testing.create_test_database(postgres, "products")
    await testing.migrate(ALEMBIC_INI, url)
    return url


@pytest.fixture(scope="session")
async def products_engine(products_db):
    async with testing.engine_for(products_db) as engine:
        yield engine


@pytest.fixture(scope="session")
def tokens() -> testing.TokenFactory:
    return testing.TokenFactory()


@pytest.fixture(scope="session")
def products_app(products_db, tokens):
    settings = ProductsSettings(database_url=products_db, internal_token=INTERNAL_TOKEN)
    return build_app(settings, token_verifier=tokens.verifier())


@pytest.fixture
async def session(products_engine):
    async with testing.rollback_session(products_engine) as session:
        yield session


@pytest.fixture
async def client(products_app, session):
    async with testing.app_client(products_app, session) as client:
        yield client


@pytest.fixture
def admin(tokens) -> dict[str, str]:
    return tokens.auth_header("admin-1", roles=["admin"], email="admin@example.com")


@pytest.fixture
def customer(tokens) -> dict[str, str]:
    return tokens.auth_header("42", roles=["customer"], email="c@example.com")
