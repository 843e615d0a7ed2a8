"""`python -m emporium_users migrate | rotate-keys` (create-admin: test_throttling_admin_concurrency.py)."""

import asyncio

import pytest
from emporium_common import testing
from emporium_users import __main__ as cli
from emporium_users.keys import KeyRing, generate_local_keys
from sqlalchemy import inspect


async def test_migrate_creates_the_schema(postgres, monkeypatch):
    url = testing.create_test_database(postgres, "users_cli")
    monkeypatch.setenv("DATABASE_URL", url)
    assert await asyncio.to_thread(cli.main, ["migrate"]) == 0
    assert await asyncio.to_thread(cli.main, ["migrate"]) == 0  # idempotent
    async with testing.engine_for(url) as engine, engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    assert {"users", "refresh_tokens", "login_attempts", "alembic_version"} <= tables


def test_rotate_keys(tmp_path, monkeypatch):
    generate_local_keys(tmp_path)
    before = KeyRing(tmp_path)
    current, nxt = before.current.kid, [k["kid"] for k in before.jwks()["keys"]][1]
    monkeypatch.setenv("JWT_KEYS_DIR", str(tmp_path))
    assert cli.main(["rotate-keys"]) == 0
    after = KeyRing(tmp_path)
    kids = [k["kid"] for k in after.jwks()["keys"]]
    assert after.current.kid == nxt  # next became current
    assert kids[0] == nxt and kids[2] == current and len(set(kids)) == 3  # old current is now previous
    assert oct((tmp_path / "current.pem").stat().st_mode & 0o777) == "0o600"


def test_production_needs_mounted_keys(tmp_path):
    from emporium_users.config import UsersSettings
    from emporium_users.main import build_app

    settings = UsersSettings(
        environment="production",
        database_url="postgresql://users_owner:Zr8s2k1x9Qw@db.emporium.svc:5432/users",
        jwt_keys_dir=tmp_path / "mounted",
    )
    # Never generated in production: tokens signed by a key nobody published would be useless.
    with pytest.raises(FileNotFoundError):
        build_app(settings)
    assert not (tmp_path / "mounted").exists()


def test_production_refuses_a_weak_admin_password():
    from emporium_users.config import UsersSettings
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="ADMIN_PASSWORD"):
        UsersSettings(
            environment="production",
            database_url="postgresql://users_owner:Zr8s2k1x9Qw@db.emporium.svc:5432/users",
            admin_email="root@example.com",
            admin_password="short-pw",
        )


@pytest.mark.parametrize(
    "admin",
    [
        {"admin_email": "admin@emporium.local", "admin_password": "long enough pw"},  # special-use domain
        {"admin_email": "admin@example.com", "admin_password": "short"},
        {"admin_email": "admin@example.com", "admin_password": "long enough pw", "admin_username": "x"},
    ],
)
def test_invalid_bootstrap_admin_fails_at_startup(admin):
    from emporium_users.config import UsersSettings
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        UsersSettings(**admin)
