"""pytest fixtures for the test bed: session-scoped, started on first use, stopped at the end.

Use them by name in any test of the repository (the root conftest.py loads this plugin):
``control_plane``, ``postgres``, ``rabbitmq``, ``smtp_sink``, ``oidc_provider``. A component that cannot
start fails the tests that need it with the reason and its log file; nothing is skipped.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from pathlib import Path

import pytest

from .controlplane import ControlPlane
from .oidc import MockOIDCProvider
from .postgres import PostgresServer
from .rabbitmq import RabbitMQServer
from .smtp import SMTPSink

_started: list = []


def _stop_all() -> None:
    while _started:
        _started.pop().stop()


# A run interrupted before session teardown still stops every server it started.
atexit.register(_stop_all)


@pytest.fixture(scope="session")
def testbed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder of this run's servers; their data and logs stay here after the run (pytest keeps
    the last three runs under its basetemp) for a look after a failure."""
    path = tmp_path_factory.mktemp("testbed")
    path.chmod(0o755)  # the postgres and rabbitmq users must reach their folders inside it
    # pytest makes its basetemp and the per-user folder above it 0o700: let those users traverse them
    # (search permission only, no listing).
    basetemp = tmp_path_factory.getbasetemp()
    parents = [basetemp] + ([basetemp.parent] if basetemp.parent.name.startswith("pytest-of-") else [])
    for parent in parents:
        parent.chmod(parent.stat().st_mode | 0o111)
    return path


def _serve(server):
    _started.append(server)
    try:
        yield server
    finally:
        server.stop()
        if server in _started:
            _started.remove(server)


@pytest.fixture(scope="session")
def postgres(testbed_dir: Path) -> Iterator[PostgresServer]:
    """A Postgres 15 cluster on 127.0.0.1 with a superuser ``postgres`` (random password)."""
    yield from _serve(PostgresServer(testbed_dir / "postgres").start())


@pytest.fixture(scope="session")
def rabbitmq(testbed_dir: Path) -> Iterator[RabbitMQServer]:
    """A RabbitMQ node with the management plugin and an administrator ``admin`` (random password)."""
    yield from _serve(RabbitMQServer(testbed_dir / "rabbitmq").start())


@pytest.fixture(scope="session")
def control_plane(testbed_dir: Path) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager; ``control_plane.kubeconfig``: an admin kubeconfig."""
    yield from _serve(ControlPlane(testbed_dir / "kube").start())


@pytest.fixture(scope="session")
def smtp_sink(testbed_dir: Path) -> Iterator[SMTPSink]:
    """An SMTP server on 127.0.0.1 that keeps what it receives (``smtp_sink.messages``)."""
    yield from _serve(SMTPSink(maildir=testbed_dir / "mail").start())


@pytest.fixture(scope="session")
def oidc_provider(testbed_dir: Path) -> Iterator[MockOIDCProvider]:
    """A real OpenID provider (mock-oauth2-server) on 127.0.0.1; ``oidc_provider.issuer("any-id")`` is an
    issuer of its own, ``oidc_provider.sign_in(authorize_url, sub, claims)`` plays the browser's login."""
    yield from _serve(MockOIDCProvider(testbed_dir / "oidc").start())


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    if call.when == "call" and call.excinfo is not None and _started:
        item.add_report_section(
            "call", "testbed", f"test-bed logs: {item.config._tmp_path_factory.getbasetemp()}"
        )  # type: ignore[attr-defined]
