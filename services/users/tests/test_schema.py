"""The migrations and the models agree, and startup copes with a database that is not there yet."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from emporium_common import testing
from emporium_users.main import build_app
from emporium_users.models import SQLModel

OURS = {
    "users",
    "refresh_tokens",
    "login_attempts",
    "registration_attempts",
    "external_identities",
    "oidc_login_states",
    "oidc_login_codes",
}


def _table_of(diff) -> str | None:
    # Diff entries are tuples like ("add_column", schema, table, column) or ("add_table", Table), or lists.
    diff = diff[0] if isinstance(diff, list) else diff
    for item in diff[1:]:
        if isinstance(item, str) and item in OURS:
            return item
        name = getattr(item, "name", None) if not isinstance(item, str) else None
        table = getattr(getattr(item, "table", None), "name", None)
        if name in OURS or table in OURS:
            return name if name in OURS else table
    return None


async def test_models_match_the_migrations(engine):
    def diff(connection):
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, SQLModel.metadata)

    async with engine.connect() as conn:
        diffs = await conn.run_sync(diff)
    # SQLModel.metadata also holds the other services' tables when the whole suite runs: only ours count.
    ours = [d for d in diffs if _table_of(d) is not None]
    assert ours == []


async def test_startup_survives_a_database_that_is_down(settings):
    down = settings.model_copy(
        update={
            "database_url": "postgresql+asyncpg://nobody:nothing@127.0.0.1:1/users",
            "admin_email": "root@example.com",
            "admin_password": "a strong admin password",
        }
    )
    app = build_app(down)
    async with app.router.lifespan_context(app), testing.app_client(app) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        assert (
            await client.post("/users/login", json={"email": "a@b.co", "password": "x"})
        ).status_code == 503
