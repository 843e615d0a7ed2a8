"""One kind cluster per test session, shared by every test that needs it (test_kind_cluster.py and the
"kind" half of test_platform.py): created by the first of them (tools/kind/cluster.sh up), deleted at the
session's end (tools/kind/cluster.sh down), nothing left running.

The cluster's ingress holds port 8080, as `make up` does: the tests that use the cluster run last in the
session, after everything that starts the local platform.

When the kind tests run: EMPORIUM_KIND=1 always (a cluster that cannot be had fails them with the reason);
EMPORIUM_KIND=0 never; unset, when RUN_BY_DEFAULT (emporium_testbed.kind) is on and Docker can run containers
here. Left out, they are deselected at collection and the reason is printed at the start and the end of the
run, never skipped quietly.

`local`: a local platform (`make up` in a temporary root) per module that uses it (test_platform.py keeps
its own), stopped at the module's end (before the kind tests take port 8080); `down` must leave no process
behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from emporium_testbed.ingress import GATEWAY_PORT
from emporium_testbed.kind import RUN_BY_DEFAULT, KindPlatform, kind_unavailable
from emporium_testbed.process import pid_alive, port_open

NOT_RUN = pytest.StashKey[str]()


def _uses_kind(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    callspec = getattr(item, "callspec", None)
    return "kind_cluster" in fixtures or (callspec is not None and callspec.params.get("platform") == "kind")


def _why_not() -> str | None:
    """Why the kind tests are left out of this run, or None when they run (and must pass)."""
    wanted = os.environ.get("EMPORIUM_KIND", "")
    if wanted == "0":
        return "EMPORIUM_KIND=0"
    if wanted == "1":
        return None  # asked for: a cluster that cannot be had fails the tests with its reason
    if not RUN_BY_DEFAULT:
        return "the kind suite is opt-in (EMPORIUM_KIND=1 runs it)"
    return kind_unavailable()  # run by default whenever Docker can run containers here


@pytest.hookimpl(trylast=True)  # after pytest groups the module-scoped platform params
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]):
    items.sort(key=_uses_kind)  # stable: everything else keeps its order, the kind tests go last
    kind = [item for item in items if _uses_kind(item)]
    if kind and (reason := _why_not()):
        items[:] = [item for item in items if not _uses_kind(item)]
        config.hook.pytest_deselected(items=kind)
        config.stash[NOT_RUN] = f"{len(kind)} kind tests did not run: {reason}"


def pytest_report_collectionfinish(config: pytest.Config) -> str | None:
    return config.stash.get(NOT_RUN, None)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if reason := config.stash.get(NOT_RUN, None):
        terminalreporter.write_sep("=", reason, yellow=True)


@pytest.fixture(scope="session")
def kind_cluster():
    if reason := kind_unavailable():
        pytest.fail(f"the kind suite cannot run here: {reason}")
    with KindPlatform() as cluster:
        yield cluster


def platform(root: Path, command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emporium_testbed.platform", command, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory):
    assert not port_open("127.0.0.1", GATEWAY_PORT), "port 8080 is taken (is `make up` running? `make down`)"
    root = tmp_path_factory.mktemp("platform")
    for folder in (root, root.parent, root.parent.parent):
        folder.chmod(folder.stat().st_mode | 0o111)  # postgres and rabbitmq users traverse into it
    started = time.monotonic()
    try:
        up = platform(root, "up")
        assert up.returncode == 0, f"make up failed:\n{up.stdout[-3000:]}\n{up.stderr[-5000:]}"
        print(f"cold up: {time.monotonic() - started:.0f} s")
        yield root
    finally:
        pids = [int(p.read_text()) for p in root.rglob("*.pid") if p.read_text().strip().isdigit()]
        down = platform(root, "down", timeout=300)
        assert down.returncode == 0, down.stderr
        alive = [pid for pid in pids if pid_alive(pid)]
        assert not alive, f"processes left after down: {alive}"
        assert not port_open("127.0.0.1", GATEWAY_PORT)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (rep_setup, rep_call): fixtures see whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
