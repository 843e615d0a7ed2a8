"""Schemathesis against the notifications service's OpenAPI (bounded): no request may produce a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from emporium_common import testing
from emporium_common.migrations import upgrade_head
from emporium_notifications.config import NotificationsSettings
from emporium_notifications.main import build_app

ALEMBIC_INI = Path(__file__).resolve().parents[1] / "alembic.ini"
schema = schemathesis.openapi.from_dict(build_app(NotificationsSettings()).openapi())


@pytest.fixture(scope="module")
def fuzz_target(postgres, smtp_sink):
    tokens = testing.TokenFactory()
    url = testing.create_test_database(postgres, "fuzz_notifications")
    upgrade_head(ALEMBIC_INI, url)
    postgres.psql(
        "INSERT INTO notifications"
        " (event_id, type, recipient_email, subject, body, text_body, user_id, status) VALUES"
        " (gen_random_uuid(), 'welcome', 'f@example.com', 'Hi', '<p>Hi</p>', 'Hi', 'fuzz-admin', 'failed')",
        url.rsplit("/", 1)[1],
    )
    settings_ = NotificationsSettings(
        database_url=url, smtp_host=smtp_sink.host, smtp_port=smtp_sink.port, background_workers=False
    )
    server, thread, base = testing.serve_in_thread(build_app(settings_, token_verifier=tokens.verifier()))
    yield base, tokens.auth_header("fuzz-admin", roles=["admin"])
    server.should_exit = True
    thread.join(20)


@schema.parametrize()
@testing.fuzz_settings()
def test_no_server_errors(case, fuzz_target):
    testing.call_without_server_error(case, *fuzz_target)
