"""One kind cluster per test session, shared by every test that needs it (test_kind_cluster.py and
test_kind_platform.py), created by the first of them (tools/kind/cluster.sh up), deleted at the session's end.

The cluster's ingress holds port 8080, as `make up` does: the tests that use the cluster run last in the
session, after everything that starts the local platform.
"""

from __future__ import annotations

import pytest
from emporium_testbed.kind import KindPlatform, kind_unavailable


def _uses_kind(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    callspec = getattr(item, "callspec", None)
    return "kind_cluster" in fixtures or (callspec is not None and callspec.params.get("platform") == "kind")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]):
    items.sort(key=_uses_kind)  # stable: everything else keeps its order, the kind tests go last


@pytest.fixture(scope="session")
def kind_cluster():
    if reason := kind_unavailable():
        pytest.skip(reason)
    with KindPlatform() as cluster:
        yield cluster
