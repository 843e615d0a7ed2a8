import pytest
from emporium_common import testing


@pytest.fixture(scope="session")
def common_database_url(postgres) -> str:
    return testing.create_test_database(postgres, "common")


@pytest.fixture(scope="session")
async def common_engine(common_database_url):
    async with testing.engine_for(common_database_url) as engine:
        yield engine
