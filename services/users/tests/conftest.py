from pathlib import Path

import pytest
from emporium_common import testing
from emporium_users import security
from emporium_users.config import UsersSettings
from emporium_users.keys import generate_local_keys
from emporium_users.main import build_app

ALEMBIC_INI = Path(__file__).parents[1] / "alembic.ini"

# Production cost is 12; the minimum keeps the suite fast and still exercises real bcrypt.
security.BCRYPT_ROUNDS = 4


@pytest.fixture(scope="session")
async def database_url(postgres) -> str:
    url = testing.create_test_database(postgres, "users")
    await testing.migrate(ALEMBIC_INI, url)
    return url


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jwt-keys")
    generate_local_keys(path)
    return path


@pytest.fixture(scope="session")
def settings(database_url, keys_dir) -> UsersSettings:
    return UsersSettings(database_url=database_url, jwt_keys_dir=keys_dir)


@pytest.fixture(scope="session")
def app(settings):
    return build_app(settings)


@pytest.fixture(scope="session")
async def engine(database_url):
    async with testing.engine_for(database_url) as engine:
        yield engine


@pytest.fixture
async def session(engine):
    async with testing.rollback_session(engine) as session:
        yield session


@pytest.fixture
async def client(app, session):
    async with testing.app_client(app, session) as client:
        yield client


PASSWORD = "correct horse"


async def register(client, email="ada@example.com", username="ada", password=PASSWORD):
    response = await client.post(
        "/users/register", json={"email": email, "username": username, "password": password}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def login(client, email="ada@example.com", password=PASSWORD):
    response = await client.post("/users/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
