"""Schemathesis against the products service's OpenAPI (bounded): no request may produce a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from emporium_common import testing
from emporium_common.migrations import upgrade_head
from emporium_products.config import ProductsSettings
from emporium_products.main import build_app

TOKEN = "fuzz-internal-token-0123456789"
ALEMBIC_INI = Path(__file__).resolve().parents[1] / "alembic.ini"
schema = schemathesis.openapi.from_dict(build_app(ProductsSettings(internal_token=TOKEN)).openapi())


@pytest.fixture(scope="module")
def fuzz_target(postgres):
    tokens = testing.TokenFactory()
    url = testing.create_test_database(postgres, "fuzz_products")
    upgrade_head(ALEMBIC_INI, url)
    server, thread, base = testing.serve_in_thread(
        build_app(ProductsSettings(database_url=url, internal_token=TOKEN), token_verifier=tokens.verifier())
    )
    headers = {**tokens.auth_header("fuzz-admin", roles=["admin"]), "X-Internal-Token": TOKEN}
    yield base, headers
    server.should_exit = True
    thread.join(20)


@schema.parametrize()
@testing.fuzz_settings()
def test_no_server_errors(case, fuzz_target):
    testing.call_without_server_error(case, *fuzz_target)
