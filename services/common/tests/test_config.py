import pytest
from emporium_common.config import Settings, to_asyncpg_url
from pydantic import ValidationError

STRONG_DB = "postgresql://users_owner:Zr8s2k1x9Qw@db.emporium.svc:5432/users"
JWKS = "http://users.emporium.svc.cluster.local:8000/.well-known/jwks.json"


def test_database_url_switches_to_asyncpg():
    assert to_asyncpg_url("postgresql://u:p@h:5432/d") == "postgresql+asyncpg://u:p@h:5432/d"
    assert to_asyncpg_url("postgres://u:p@h/d") == "postgresql+asyncpg://u:p@h/d"
    assert Settings(database_url="postgresql://u:p@h/d").database_url.startswith("postgresql+asyncpg://")


def test_rejects_non_postgres_url():
    with pytest.raises(ValidationError):
        Settings(database_url="mysql://u:p@h/d")


def test_reads_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://a:b@c:1/d")
    monkeypatch.setenv("JWT_AUDIENCE", "shop")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.database_url == "postgresql+asyncpg://a:b@c:1/d"
    assert settings.jwt_audience == "shop"
    assert settings.log_level == "DEBUG"
    assert settings.otel_traces_exporter == "none"
    assert settings.jwt_issuer == "https://emporium.local/users"


@pytest.mark.parametrize(
    "overrides",
    [
        {"database_url": "postgresql://postgres:postgres@db:5432/users"},
        {"database_url": "postgresql://u@db:5432/users"},
        {"database_url": "postgresql://u:Zr8s2k1x9Qw@localhost:5432/users"},
        {"amqp_url": "amqp://guest:guest@rabbit:5672/"},
        {"log_level": "DEBUG"},
        {"otel_traces_exporter": "otlp"},
        {"jwks_url": None},
        {"jwks_url": "file:///etc/jwks.json"},
        {"reload_dir": "/app/dev"},
    ],
)
def test_production_refuses_weak_config(overrides):
    values = {"environment": "production", "database_url": STRONG_DB, "jwks_url": JWKS, **overrides}
    with pytest.raises(ValidationError, match="refusing weak production configuration"):
        Settings(**values)


def test_production_accepts_strong_config():
    settings = Settings(
        environment="production",
        database_url=STRONG_DB,
        amqp_url="amqp://svc:Zr8s2k1x9Qw@rabbit:5672/emporium",
        jwks_url=JWKS,
    )
    assert settings.is_production


def test_local_allows_defaults():
    assert not Settings(database_url="postgresql://postgres:postgres@localhost/x").is_production


def test_internal_token_settings_are_required_in_production():
    from emporium_common.config import InternalTokenSettings

    strong = {
        "environment": "production",
        "database_url": "postgresql://svc:Str0ng-Passw0rd-123@db:5432/x",
        "jwks_url": "http://users:8000/.well-known/jwks.json",
    }
    with pytest.raises(ValueError, match="INTERNAL_TOKEN is not set"):
        InternalTokenSettings(**strong)
    assert InternalTokenSettings(**strong, internal_token="x" * 16).internal_token == "x" * 16
    with pytest.raises(ValueError):
        InternalTokenSettings(internal_token="too-short")
    assert InternalTokenSettings().internal_token is None  # locally: the internal API just refuses calls
