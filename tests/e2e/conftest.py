"""One kind cluster per test session, shared by every test that needs it (test_kind_cluster.py and
test_kind_platform.py), created by the first of them (tools/kind/cluster.sh up), deleted at the session's end.

The cluster's ingress holds port 8080, as `make up` does: the tests that use the cluster run last in the
session, after everything that starts the local platform.

The kind suite is opt-in until a whole `make kind-up` has run green here (EMPORIUM_KIND=1): without it the
kind tests are deselected at collection (counted as deselected in pytest's summary). Once asked for, a
cluster that cannot be had fails those tests with the reason; nothing is skipped.
"""

from __future__ import annotations

import os

import pytest
from emporium_testbed.kind import RUN_BY_DEFAULT, KindPlatform, kind_unavailable


def _uses_kind(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    callspec = getattr(item, "callspec", None)
    return "kind_cluster" in fixtures or (callspec is not None and callspec.params.get("platform") == "kind")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]):
    items.sort(key=_uses_kind)  # stable: everything else keeps its order, the kind tests go last
    if os.environ.get("EMPORIUM_KIND", "1" if RUN_BY_DEFAULT else "0") == "0":
        kind = [item for item in items if _uses_kind(item)]
        if kind:
            items[:] = [item for item in items if not _uses_kind(item)]
            config.hook.pytest_deselected(items=kind)


@pytest.fixture(scope="session")
def kind_cluster():
    if reason := kind_unavailable():
        pytest.fail(f"the kind suite was asked for (EMPORIUM_KIND=1) but cannot run: {reason}")
    with KindPlatform() as cluster:
        yield cluster
